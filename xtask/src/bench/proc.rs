//! Child processes with a time bound, commands inside a namespace, and Ctrl-C.
//!
//! Ctrl-C (SIGINT) and SIGTERM only set a flag; every wait loop polls it, kills the
//! child it waits for and returns an error, so the bench unwinds through its Drop
//! guards and removes what it made.

use std::io::Read;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

use crate::describe;

static INTERRUPTED: AtomicBool = AtomicBool::new(false);

const SIGINT: i32 = 2;
const SIGTERM: i32 = 15;

unsafe extern "C" {
    /// libc's `signal(2)` (std links libc already; xtask has no libc crate).
    fn signal(signum: i32, handler: extern "C" fn(i32)) -> usize;
}

extern "C" fn on_signal(_signum: i32) {
    // Only an atomic store: async-signal-safe.
    INTERRUPTED.store(true, Ordering::SeqCst);
}

/// Makes SIGINT and SIGTERM set the interrupt flag instead of killing the bench.
pub fn install_signal_handlers() {
    for sig in [SIGINT, SIGTERM] {
        // SAFETY: `on_signal` is an `extern "C" fn(i32)` that only performs an atomic
        // store, which is async-signal-safe; `signal` has no other preconditions.
        unsafe {
            signal(sig, on_signal);
        }
    }
}

/// Fails once Ctrl-C or SIGTERM was received.
pub fn check_interrupted() -> Result<()> {
    if INTERRUPTED.load(Ordering::SeqCst) {
        bail!("interrupted");
    }
    Ok(())
}

/// `prog args…` run inside the named network namespace (only the network
/// namespace changes: `/sys` and mounts stay as they are, unlike `ip netns exec`).
pub fn ns_cmd(ns: &str, prog: &str) -> Command {
    let mut cmd = Command::new("nsenter");
    cmd.arg(format!("--net=/run/netns/{ns}")).arg(prog);
    cmd
}

/// Which side of a workload a process is: clients run on CPU 0, servers on CPU 1
/// (when there are two or more CPUs), so a sender never starves its receiver and
/// every path gets the same placement.
#[derive(Debug, Clone, Copy)]
pub enum Side {
    Client,
    Server,
}

/// [`ns_cmd`] pinned to the CPU of `side` with `taskset`.
pub fn ns_cmd_on(ns: &str, side: Side, prog: &str) -> Command {
    let cpus = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1);
    if cpus < 2 {
        return ns_cmd(ns, prog);
    }
    let cpu = match side {
        Side::Client => "0",
        Side::Server => "1",
    };
    let mut cmd = Command::new("nsenter");
    cmd.arg(format!("--net=/run/netns/{ns}"))
        .args(["taskset", "-c", cpu])
        .arg(prog);
    cmd
}

/// What a bounded run printed.
pub struct Output {
    pub stdout: String,
    pub stderr: String,
    pub success: bool,
}

/// Runs `cmd` to completion, killing it after `limit`; fails on a non-zero exit
/// status (with its stderr) or on timeout.
pub fn run_bounded(cmd: &mut Command, limit: Duration) -> Result<Output> {
    let out = run_bounded_any(cmd, limit)?;
    if !out.success {
        bail!(
            "`{}` failed: {}{}",
            describe(cmd),
            out.stderr.trim(),
            if out.stderr.trim().is_empty() {
                out.stdout.trim()
            } else {
                ""
            }
        );
    }
    Ok(out)
}

/// Like [`run_bounded`] but returns a failed exit status as `success: false`.
pub fn run_bounded_any(cmd: &mut Command, limit: Duration) -> Result<Output> {
    check_interrupted()?;
    run_inner(cmd, limit, true)
}

/// For cleanup: runs even after Ctrl-C (bounded by `limit` only).
pub fn run_cleanup(cmd: &mut Command, limit: Duration) -> Result<Output> {
    run_inner(cmd, limit, false)
}

fn run_inner(cmd: &mut Command, limit: Duration, interruptible: bool) -> Result<Output> {
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("start `{}`", describe(cmd)))?;
    let mut out_pipe = child.stdout.take().expect("piped");
    let mut err_pipe = child.stderr.take().expect("piped");
    let out_reader = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = out_pipe.read_to_string(&mut s);
        s
    });
    let err_reader = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = err_pipe.read_to_string(&mut s);
        s
    });
    let deadline = Instant::now() + limit;
    let status = loop {
        if let Some(status) = child.try_wait()? {
            break Ok(status);
        }
        if interruptible && INTERRUPTED.load(Ordering::SeqCst) {
            break Err(anyhow::anyhow!("interrupted"));
        }
        if Instant::now() > deadline {
            break Err(anyhow::anyhow!(
                "`{}` did not finish within {limit:?}",
                describe(cmd)
            ));
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    if status.is_err() {
        let _ = child.kill();
        let _ = child.wait();
    }
    let stdout = out_reader.join().unwrap_or_default();
    let stderr = err_reader.join().unwrap_or_default();
    let status = status?;
    Ok(Output {
        stdout,
        stderr,
        success: status.success(),
    })
}

/// A long-running child (a server, the daemon) that is stopped when dropped.
pub struct Server {
    name: String,
    child: Option<Child>,
    log: std::path::PathBuf,
}

impl Server {
    /// Starts `cmd` with stdout and stderr going to `log`.
    pub fn spawn(name: &str, cmd: &mut Command, log: &std::path::Path) -> Result<Server> {
        check_interrupted()?;
        let file =
            std::fs::File::create(log).with_context(|| format!("create {}", log.display()))?;
        let child = cmd
            .stdin(Stdio::null())
            .stdout(file.try_clone()?)
            .stderr(file)
            .spawn()
            .with_context(|| format!("start `{}`", describe(cmd)))?;
        Ok(Server {
            name: name.to_string(),
            child: Some(child),
            log: log.to_path_buf(),
        })
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().map(|c| c.id()).unwrap_or(0)
    }

    /// Fails (with the end of its log) if the child has exited.
    pub fn check_alive(&mut self) -> Result<()> {
        if let Some(child) = self.child.as_mut()
            && let Some(status) = child.try_wait()?
        {
            bail!("{} exited ({status}): {}", self.name, self.log_tail());
        }
        Ok(())
    }

    /// The last lines of the child's log.
    pub fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(8)..].join("\n")
    }

    /// SIGTERM, then SIGKILL after `grace`.
    pub fn stop(&mut self, grace: Duration) {
        let Some(mut child) = self.child.take() else {
            return;
        };
        if let Ok(Some(_)) = child.try_wait() {
            return;
        }
        let _ = Command::new("kill")
            .args(["-TERM", &child.id().to_string()])
            .stderr(Stdio::null())
            .status();
        let deadline = Instant::now() + grace;
        while Instant::now() < deadline {
            if let Ok(Some(_)) = child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = child.kill();
        let _ = child.wait();
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.stop(Duration::from_secs(10));
    }
}

/// Polls `ready` every 20 ms until it returns true or `limit` passes.
pub fn wait_until(what: &str, limit: Duration, mut ready: impl FnMut() -> bool) -> Result<()> {
    let deadline = Instant::now() + limit;
    loop {
        check_interrupted()?;
        if ready() {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("{what} not ready within {limit:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}
