//! A real microVM guest on a slot's TAP: QEMU (TCG; nested KVM hangs on these
//! machines) with the Debian cloud kernel and the busybox initramfs that
//! `cargo xtask guest` prepares in `target/guest/` (init script: `tests/guest/init`).
//!
//! QEMU runs inside the slot's network namespace (`nsenter --net=/run/netns/NAME`,
//! which changes only the network namespace, unlike `ip netns exec`) and opens the
//! existing TAP there. The guest configures `eth0` (169.254.0.21/30 via
//! 169.254.0.22 unless told otherwise) and runs one shell command given on the
//! kernel command line; everything it prints arrives on the serial console, which
//! this fixture collects so tests can wait for markers.
//!
//! ```ignore
//! let vm = GuestVm::boot("t1a2b-ns-1", "tap0", "wget -q -O- http://198.18.0.1:8080/; echo DONE")?;
//! vm.wait_for("DONE", Duration::from_secs(30))?;
//! ```
//!
//! The VM is killed (its own PID only) when the `GuestVm` is dropped, and by the
//! kernel if the thread that booted it exits first.

use std::io::Read;
use std::net::Ipv4Addr;
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

/// Prefix of every line the guest's init prints about itself.
pub const MARKER: &str = "NETAGENT-GUEST: ";
/// How long a boot may take until the guest runs its command (about 2-3 s is
/// usual under TCG; CI machines can be much slower).
pub const BOOT_TIMEOUT: Duration = Duration::from_secs(90);
/// The QEMU binary.
pub const QEMU: &str = "qemu-system-x86_64";
/// The guest's default address (DESIGN §1).
pub const GUEST_IP: Ipv4Addr = Ipv4Addr::new(169, 254, 0, 21);
/// The guest's default gateway: the slot's TAP address.
pub const GUEST_GATEWAY: Ipv4Addr = Ipv4Addr::new(169, 254, 0, 22);
/// The guest NIC's MAC unless told otherwise.
pub const GUEST_MAC: &str = "02:fc:00:00:00:15";
/// x86's kernel command line limit (COMMAND_LINE_SIZE).
const CMDLINE_MAX: usize = 2048;

/// The kernel and initramfs `cargo xtask guest` leaves in `target/guest/`
/// (or in `$NETAGENT_GUEST_DIR`).
#[derive(Debug, Clone)]
pub struct GuestImage {
    /// The guest kernel (`vmlinuz`).
    pub kernel: PathBuf,
    /// The initramfs (`initramfs.cpio`).
    pub initramfs: PathBuf,
}

impl GuestImage {
    /// Finds the prepared guest and QEMU, or says exactly what to run.
    pub fn locate() -> Result<GuestImage> {
        let dir = std::env::var_os("NETAGENT_GUEST_DIR")
            .map(PathBuf::from)
            .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target/guest"));
        let image = GuestImage {
            kernel: dir.join("vmlinuz"),
            initramfs: dir.join("initramfs.cpio"),
        };
        for file in [&image.kernel, &image.initramfs] {
            if !file.is_file() {
                bail!(
                    "the test guest is not prepared: {} is missing. Run `cargo xtask guest` \
                     (`cargo xtask test` does it before the tests)",
                    file.display()
                );
            }
        }
        let qemu = Command::new(QEMU)
            .arg("--version")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
        if !qemu.is_ok_and(|s| s.success()) {
            bail!(
                "{QEMU} cannot be run: install Debian's qemu-system-x86 (`cargo xtask deps` does)"
            );
        }
        Ok(image)
    }
}

/// How to boot a guest.
#[derive(Debug, Clone)]
pub struct GuestConfig {
    /// Network namespace (a name in `/run/netns`) that holds the TAP.
    pub netns: String,
    /// The TAP QEMU attaches to (it must exist already).
    pub tap: String,
    /// Shell command the guest runs once its network is up. When it exits the
    /// guest prints `NETAGENT-GUEST: EXIT <status>` and powers off.
    pub cmd: String,
    /// Guest address with prefix length, e.g. `169.254.0.21/30`.
    pub addr: String,
    /// Guest default gateway.
    pub gateway: Ipv4Addr,
    /// Guest NIC MAC.
    pub mac: String,
    /// Guest memory.
    pub memory_mib: u32,
    /// Checksum and segmentation offload between guest and TAP (virtio-net's
    /// `csum`, `gso`, TSO/UFO features). On (the default, as a VMM runs it), the
    /// guest hands over packets with partial checksums and up to 64 KiB TCP
    /// segments; off, every packet is complete and MTU-sized.
    pub offload: bool,
}

impl GuestConfig {
    /// The slot defaults (DESIGN §1) on `tap` in `netns`.
    pub fn new(netns: &str, tap: &str, cmd: &str) -> GuestConfig {
        GuestConfig {
            netns: netns.to_string(),
            tap: tap.to_string(),
            cmd: cmd.to_string(),
            addr: format!("{GUEST_IP}/30"),
            gateway: GUEST_GATEWAY,
            mac: GUEST_MAC.to_string(),
            memory_mib: 256,
            offload: true,
        }
    }

    fn append(&self) -> Result<String> {
        // acpi=off saves about a second of TCG boot (no AML interpretation, no
        // ACPI PCI link setup); the guest ends with `reboot -f`, which -no-reboot
        // turns into QEMU exiting.
        let append = format!(
            "console=ttyS0 quiet panic=-1 acpi=off na.ip={} na.gw={} na.cmd={}",
            self.addr,
            self.gateway,
            base64(self.cmd.as_bytes())
        );
        if append.len() >= CMDLINE_MAX {
            bail!(
                "the guest command is too long for the kernel command line ({} of {CMDLINE_MAX} bytes): shorten it",
                append.len()
            );
        }
        Ok(append)
    }
}

/// Serial console text collected so far, and whether QEMU has closed it.
#[derive(Default)]
struct Console {
    text: Mutex<(String, bool)>,
    changed: Condvar,
}

/// A running QEMU guest.
pub struct GuestVm {
    child: Child,
    console: Arc<Console>,
    readers: Vec<JoinHandle<()>>,
    started: Instant,
    boot_time: Duration,
    netns: String,
}

impl GuestVm {
    /// Boots a guest with the slot defaults on `tap` in `netns` running `cmd`, and
    /// waits until its network is configured and the command has started.
    pub fn boot(netns: &str, tap: &str, cmd: &str) -> Result<GuestVm> {
        Self::boot_with(&GuestConfig::new(netns, tap, cmd))
    }

    /// Boots a guest as `cfg` says; returns once the command runs
    /// (`NETAGENT-GUEST: RUN`), or fails with the console so far.
    pub fn boot_with(cfg: &GuestConfig) -> Result<GuestVm> {
        let image = GuestImage::locate()?;
        let netns_path = format!("/run/netns/{}", cfg.netns);
        if !std::path::Path::new(&netns_path).exists() {
            bail!("network namespace {netns_path} does not exist");
        }
        let mut cmd = Command::new("nsenter");
        cmd.arg(format!("--net={netns_path}"))
            .arg("--")
            .arg(QEMU)
            .args([
                "-accel",
                "tcg",
                "-nographic",
                "-nodefaults",
                "-no-user-config",
                "-no-reboot",
            ])
            .args(["-serial", "stdio", "-smp", "1"])
            .arg("-m")
            .arg(cfg.memory_mib.to_string())
            .arg("-kernel")
            .arg(&image.kernel)
            .arg("-initrd")
            .arg(&image.initramfs)
            .arg("-append")
            .arg(cfg.append()?)
            .arg("-netdev")
            .arg(format!(
                "tap,id=n0,ifname={},script=no,downscript=no,vhost=off",
                cfg.tap
            ))
            .arg("-device")
            // romfile= skips the iPXE option ROM: nothing boots from the network.
            .arg(format!(
                "virtio-net-pci,netdev=n0,mac={},romfile={}",
                cfg.mac,
                offload_props(cfg.offload)
            ))
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        // SAFETY: the closure runs in the forked child before exec and only calls
        // prctl(2), which is async-signal-safe; it touches no memory of the parent.
        unsafe {
            cmd.pre_exec(|| {
                // nsenter execs QEMU in place, so this reaches QEMU: it dies with
                // the booting thread even if the test process is killed.
                if libc::prctl(
                    libc::PR_SET_PDEATHSIG,
                    libc::SIGKILL as libc::c_ulong,
                    0,
                    0,
                    0,
                ) != 0
                {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let started = Instant::now();
        let mut child = cmd
            .spawn()
            .with_context(|| format!("start nsenter {QEMU} (is util-linux installed?)"))?;
        let console = Arc::new(Console::default());
        let mut readers = Vec::new();
        let stdout = child.stdout.take().context("QEMU stdout")?;
        let stderr = child.stderr.take().context("QEMU stderr")?;
        readers.push(spawn_reader(stdout, "", console.clone()));
        readers.push(spawn_reader(stderr, "qemu: ", console.clone()));
        let mut vm = GuestVm {
            child,
            console,
            readers,
            started,
            boot_time: Duration::ZERO,
            netns: cfg.netns.clone(),
        };
        vm.wait_for(&format!("{MARKER}RUN"), BOOT_TIMEOUT)
            .context("the guest did not come up")?;
        vm.boot_time = started.elapsed();
        Ok(vm)
    }

    /// Time from starting QEMU until the guest ran its command.
    pub fn boot_time(&self) -> Duration {
        self.boot_time
    }

    /// QEMU's PID.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Everything the console printed so far (`\r` removed).
    pub fn console(&self) -> String {
        self.console
            .text
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .0
            .clone()
    }

    /// Waits until a console line contains `needle` and returns that line. Fails
    /// at the timeout, when QEMU exits first, or when the guest's init reports an
    /// error, quoting the console.
    pub fn wait_for(&self, needle: &str, timeout: Duration) -> Result<String> {
        let deadline = Instant::now() + timeout;
        let error_marker = format!("{MARKER}ERROR");
        let mut guard = self.console.text.lock().unwrap_or_else(|e| e.into_inner());
        loop {
            let (text, closed) = &*guard;
            // Only whole lines: a marker's line may still be arriving.
            let complete = if *closed {
                &text[..]
            } else {
                &text[..text.rfind('\n').map_or(0, |i| i + 1)]
            };
            if let Some(line) = complete.lines().find(|l| l.contains(needle)) {
                return Ok(line.to_string());
            }
            if let Some(line) = text.lines().find(|l| l.contains(&error_marker)) {
                bail!(
                    "guest init failed ({line}) while waiting for {needle:?}{}",
                    tail(text)
                );
            }
            if *closed {
                bail!(
                    "QEMU exited before the console showed {needle:?} ({:.1?} after start){}",
                    self.started.elapsed(),
                    tail(text)
                );
            }
            let now = Instant::now();
            if now >= deadline {
                bail!(
                    "the console did not show {needle:?} within {timeout:?} (netns {}){}",
                    self.netns,
                    tail(text)
                );
            }
            guard = self
                .console
                .changed
                .wait_timeout(guard, deadline - now)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
    }

    /// Waits for the guest command to finish and returns its exit status.
    pub fn wait_exit(&self, timeout: Duration) -> Result<i32> {
        let line = self.wait_for(&format!("{MARKER}EXIT "), timeout)?;
        let status = line
            .split(&format!("{MARKER}EXIT ")[..])
            .nth(1)
            .and_then(|s| s.trim().parse().ok())
            .with_context(|| format!("malformed exit marker {line:?}"))?;
        Ok(status)
    }
}

impl Drop for GuestVm {
    fn drop(&mut self) {
        // Only our own child: QEMU (nsenter exec'd it in place).
        let _ = self.child.kill();
        let _ = self.child.wait();
        for reader in self.readers.drain(..) {
            let _ = reader.join();
        }
    }
}

/// virtio-net-pci properties for the offload setting (empty: QEMU's defaults).
fn offload_props(offload: bool) -> &'static str {
    if offload {
        ""
    } else {
        ",csum=off,guest_csum=off,gso=off,host_tso4=off,host_tso6=off,host_ecn=off,host_ufo=off,\
         guest_tso4=off,guest_tso6=off,guest_ecn=off,guest_ufo=off"
    }
}

/// Copies one of QEMU's output pipes into the console, line by line.
fn spawn_reader(
    mut pipe: impl Read + Send + 'static,
    prefix: &'static str,
    console: Arc<Console>,
) -> JoinHandle<()> {
    std::thread::spawn(move || {
        let mut buf = [0u8; 4096];
        let mut at_line_start = true;
        loop {
            let n = match pipe.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => n,
            };
            let chunk = String::from_utf8_lossy(&buf[..n]).replace('\r', "");
            let mut guard = console.text.lock().unwrap_or_else(|e| e.into_inner());
            for piece in chunk.split_inclusive('\n') {
                if at_line_start && !prefix.is_empty() {
                    guard.0.push_str(prefix);
                }
                guard.0.push_str(piece);
                at_line_start = piece.ends_with('\n');
            }
            console.changed.notify_all();
        }
        if !prefix.is_empty() {
            // stderr closing does not mean the console is done.
            return;
        }
        console.text.lock().unwrap_or_else(|e| e.into_inner()).1 = true;
        console.changed.notify_all();
    })
}

/// The last lines of the console, for error messages.
fn tail(text: &str) -> String {
    let lines: Vec<&str> = text.lines().collect();
    let from = lines.len().saturating_sub(40);
    format!(
        "\n--- guest console (last {} lines) ---\n{}",
        lines.len() - from,
        lines[from..].join("\n")
    )
}

/// Standard base64 (the guest decodes `na.cmd` with busybox `base64 -d`).
fn base64(data: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(data.len().div_ceil(3) * 4);
    for chunk in data.chunks(3) {
        let b = [
            chunk[0],
            *chunk.get(1).unwrap_or(&0),
            *chunk.get(2).unwrap_or(&0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(ALPHABET[(n >> (18 - 6 * i) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

/// Guest-side shell snippets for common test roles.
pub mod guest_cmd {
    /// Starts busybox `httpd` on `port` in the background. It serves `/` (the text
    /// `body`) and `/cgi-bin/peer`, which answers `peer=<client address>` — so a
    /// test sees which source address reached the guest.
    pub fn http_server(port: u16, body: &str) -> String {
        format!(
            "mkdir -p /www/cgi-bin; echo '{body}' > /www/index.html; \
             printf '#!/bin/sh\\necho Content-Type: text/plain\\necho\\necho peer=$REMOTE_ADDR\\n' > /www/cgi-bin/peer; \
             chmod +x /www/cgi-bin/peer; httpd -p 0.0.0.0:{port} -h /www; echo 'NETAGENT-TEST: HTTPD {port}'"
        )
    }

    /// Fetches `url` with busybox `wget` (at most 20 s; Debian's static busybox
    /// `wget -T` crashes, so `timeout` bounds it) and prints the body between
    /// `NETAGENT-TEST: BODY-BEGIN` and `NETAGENT-TEST: BODY-END`, then
    /// `NETAGENT-TEST: FETCH <status>`.
    pub fn http_get(url: &str) -> String {
        format!(
            "echo 'NETAGENT-TEST: BODY-BEGIN'; timeout 20 wget -q -O - '{url}'; rc=$?; echo; \
             echo 'NETAGENT-TEST: BODY-END'; echo \"NETAGENT-TEST: FETCH $rc\""
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base64_matches_rfc4648_vectors() {
        for (plain, encoded) in [
            ("", ""),
            ("f", "Zg=="),
            ("fo", "Zm8="),
            ("foo", "Zm9v"),
            ("foob", "Zm9vYg=="),
            ("fooba", "Zm9vYmE="),
            ("foobar", "Zm9vYmFy"),
        ] {
            assert_eq!(base64(plain.as_bytes()), encoded);
        }
    }

    #[test]
    fn long_commands_are_refused() {
        let cfg = GuestConfig::new("ns", "tap0", &"x".repeat(2000));
        assert!(cfg.append().is_err());
        assert!(GuestConfig::new("ns", "tap0", "true").append().is_ok());
    }
}
