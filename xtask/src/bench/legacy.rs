//! The seed's datapath and control plane, reproduced inside the legacy world.
//!
//! Rules are exactly the seed's (`CreateNetwork` in setup.go): in the slot
//! namespace `SNAT guest→vpeer` (nat POSTROUTING -o eth0) and `DNAT HostIP→guest`
//! (nat PREROUTING -i eth0); in the host namespace two FORWARD ACCEPTs and one
//! MASQUERADE per slot. Other slots' host rules are inserted *ahead* of the
//! measured slot's, as on a host that created them first (the seed appends).
//! All of it lives in the bench's throwaway host namespace.

use std::fmt::Write as _;
use std::net::Ipv4Addr;
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};

use super::proc::{ns_cmd, run_bounded};
use super::topology::{GUEST_IP, HOST_IP, UPLINK, VPEER_IP, chain_veth, ip, ip_in};

const STEP: Duration = Duration::from_secs(120);

/// The seed's addressing for slot `k` (carry into the third octet).
pub fn seed_addrs(k: u32) -> (Ipv4Addr, Ipv4Addr, Ipv4Addr) {
    let host = Ipv4Addr::new(10, 11, (k >> 8) as u8, (k & 0xff) as u8);
    let off = 2 * k;
    let veth = Ipv4Addr::new(10, 12, (off >> 8) as u8, (off & 0xff) as u8);
    let vpeer = Ipv4Addr::new(10, 12, ((off + 1) >> 8) as u8, ((off + 1) & 0xff) as u8);
    (host, veth, vpeer)
}

/// The legacy world's rule state.
pub struct Legacy {
    host_ns: String,
    /// Slots whose host rules are present (1..=n).
    n: u32,
}

fn iptables(ns: &str, args: &[&str]) -> Result<()> {
    run_bounded(ns_cmd(ns, "iptables").args(args), STEP)?;
    Ok(())
}

impl Legacy {
    /// Slot 1's rules, added as the seed adds them.
    pub fn install(slot_ns: &str, host_ns: &str) -> Result<Legacy> {
        iptables(
            slot_ns,
            &[
                "-t",
                "nat",
                "-A",
                "POSTROUTING",
                "-o",
                "eth0",
                "-s",
                GUEST_IP,
                "-j",
                "SNAT",
                "--to",
                VPEER_IP,
            ],
        )?;
        iptables(
            slot_ns,
            &[
                "-t",
                "nat",
                "-A",
                "PREROUTING",
                "-i",
                "eth0",
                "-d",
                HOST_IP,
                "-j",
                "DNAT",
                "--to",
                GUEST_IP,
            ],
        )?;
        let veth = chain_veth(1);
        iptables(
            host_ns,
            &["-A", "FORWARD", "-i", &veth, "-o", UPLINK, "-j", "ACCEPT"],
        )?;
        iptables(
            host_ns,
            &["-A", "FORWARD", "-i", UPLINK, "-o", &veth, "-j", "ACCEPT"],
        )?;
        iptables(
            host_ns,
            &[
                "-t",
                "nat",
                "-A",
                "POSTROUTING",
                "-s",
                &format!("{VPEER_IP}/32"),
                "-o",
                UPLINK,
                "-j",
                "MASQUERADE",
            ],
        )?;
        Ok(Legacy {
            host_ns: host_ns.to_string(),
            n: 1,
        })
    }

    pub fn host_ns(&self) -> &str {
        &self.host_ns
    }

    /// Adds the host rules of slots `n+1..=target` ahead of everything present
    /// (one `iptables-restore --noflush`; the rules are the seed's).
    pub fn scale_to(&mut self, target: u32) -> Result<()> {
        if target <= self.n {
            return Ok(());
        }
        let mut filter = String::from("*filter\n");
        let mut nat = String::from("*nat\n");
        for k in self.n + 1..=target {
            let veth = chain_veth(k);
            let (_, _, vpeer) = seed_addrs(k);
            let _ = writeln!(filter, "-I FORWARD 1 -i {UPLINK} -o {veth} -j ACCEPT");
            let _ = writeln!(filter, "-I FORWARD 1 -i {veth} -o {UPLINK} -j ACCEPT");
            let _ = writeln!(
                nat,
                "-I POSTROUTING 1 -s {vpeer}/32 -o {UPLINK} -j MASQUERADE"
            );
        }
        filter.push_str("COMMIT\n");
        nat.push_str("COMMIT\n");
        let file = std::env::temp_dir().join(format!("{}-rules", self.host_ns));
        std::fs::write(&file, format!("{filter}{nat}"))?;
        let t0 = Instant::now();
        let res = run_bounded(
            ns_cmd(&self.host_ns, "iptables-restore")
                .args(["--noflush"])
                .arg(&file),
            Duration::from_secs(600),
        );
        let _ = std::fs::remove_file(&file);
        res.with_context(|| format!("insert the rules of {} slots", target - self.n))?;
        eprintln!(
            "bench: legacy host rules for {target} slots ({} FORWARD, {} MASQUERADE) in {:.1}s",
            2 * target,
            target,
            t0.elapsed().as_secs_f64()
        );
        self.n = target;
        Ok(())
    }

    /// Rules present in the host namespace (FORWARD, nat POSTROUTING).
    pub fn rule_counts(&self) -> Result<(usize, usize)> {
        let count = |table: &str| -> Result<usize> {
            let out = run_bounded(
                ns_cmd(&self.host_ns, "iptables-save").args(["-t", table]),
                STEP,
            )?;
            Ok(out.stdout.lines().filter(|l| l.starts_with("-A ")).count())
        };
        Ok((count("filter")?, count("nat")?))
    }
}

/// Timings of the seed's command sequence for one slot.
#[derive(Debug, Clone, Default)]
pub struct SeedTiming {
    /// Whole create sequence (netlink steps done with `ip`, plus the seed's real
    /// subprocesses), ms.
    pub create_ms: f64,
    /// Only the steps the seed runs as subprocesses (sysctl + 5 iptables), ms.
    pub create_subprocess_ms: f64,
    /// Whole delete sequence, ms.
    pub delete_ms: f64,
}

/// Runs the seed's `CreateNetwork` then `RemoveNetwork` for slot `k` against the
/// legacy host namespace, timed. The seed's netlink calls are done with `ip`
/// (one process each: slower than in-process netlink, so also reported without
/// them); its `ip netns exec … sysctl/iptables` and host `iptables` calls are
/// subprocesses in the seed too (the host ones here go through `nsenter`).
pub fn seed_sequence(run_prefix: &str, host_ns: &str, k: u32) -> Result<SeedTiming> {
    let ns = format!("{run_prefix}l-ns-{k}");
    let veth = chain_veth(k);
    let (host_ip, veth_ip, vpeer_ip) = seed_addrs(k);
    let (host_ip, veth_ip, vpeer_ip) = (
        host_ip.to_string(),
        veth_ip.to_string(),
        vpeer_ip.to_string(),
    );
    let mut sub = Duration::ZERO;
    let t0 = Instant::now();
    let timed = |sub: &mut Duration, cmd: &mut Command| -> Result<()> {
        let t = Instant::now();
        run_bounded(cmd, STEP)?;
        *sub += t.elapsed();
        Ok(())
    };
    let create = (|| -> Result<()> {
        ip(&["netns", "add", &ns])?;
        ip_in(
            &ns,
            &["link", "add", &veth, "type", "veth", "peer", "name", "eth0"],
        )?;
        ip_in(
            &ns,
            &["addr", "add", &format!("{vpeer_ip}/31"), "dev", "eth0"],
        )?;
        ip_in(&ns, &["link", "set", "eth0", "up"])?;
        ip_in(&ns, &["link", "set", &veth, "netns", host_ns])?;
        ip_in(&ns, &["tuntap", "add", "dev", "tap0", "mode", "tap"])?;
        ip_in(&ns, &["link", "set", "tap0", "txqueuelen", "5000"])?;
        ip_in(&ns, &["addr", "add", "169.254.0.22/30", "dev", "tap0"])?;
        ip_in(&ns, &["link", "set", "tap0", "up"])?;
        ip_in(&ns, &["link", "set", "lo", "up"])?;
        ip_in(&ns, &["route", "add", "default", "via", &veth_ip])?;
        timed(
            &mut sub,
            Command::new("ip").args([
                "netns",
                "exec",
                &ns,
                "sysctl",
                "-w",
                "net.ipv4.ip_forward=1",
            ]),
        )?;
        timed(
            &mut sub,
            Command::new("ip")
                .args(["netns", "exec", &ns, "iptables"])
                .args([
                    "-t",
                    "nat",
                    "-A",
                    "POSTROUTING",
                    "-o",
                    "eth0",
                    "-s",
                    GUEST_IP,
                    "-j",
                    "SNAT",
                    "--to",
                    &vpeer_ip,
                ]),
        )?;
        timed(
            &mut sub,
            Command::new("ip")
                .args(["netns", "exec", &ns, "iptables"])
                .args([
                    "-t",
                    "nat",
                    "-A",
                    "PREROUTING",
                    "-i",
                    "eth0",
                    "-d",
                    &host_ip,
                    "-j",
                    "DNAT",
                    "--to",
                    GUEST_IP,
                ]),
        )?;
        ip_in(
            host_ns,
            &["addr", "add", &format!("{veth_ip}/31"), "dev", &veth],
        )?;
        ip_in(host_ns, &["link", "set", &veth, "up"])?;
        ip_in(
            host_ns,
            &["route", "add", &format!("{host_ip}/32"), "via", &vpeer_ip],
        )?;
        timed(
            &mut sub,
            ns_cmd(host_ns, "iptables")
                .args(["-A", "FORWARD", "-i", &veth, "-o", UPLINK, "-j", "ACCEPT"]),
        )?;
        timed(
            &mut sub,
            ns_cmd(host_ns, "iptables")
                .args(["-A", "FORWARD", "-i", UPLINK, "-o", &veth, "-j", "ACCEPT"]),
        )?;
        timed(
            &mut sub,
            ns_cmd(host_ns, "iptables").args([
                "-t",
                "nat",
                "-A",
                "POSTROUTING",
                "-s",
                &format!("{vpeer_ip}/32"),
                "-o",
                UPLINK,
                "-j",
                "MASQUERADE",
            ]),
        )?;
        Ok(())
    })();
    let create_ms = t0.elapsed().as_secs_f64() * 1e3;
    let t1 = Instant::now();
    // RemoveNetwork: every step tried.
    let steps: Vec<Result<()>> = vec![
        iptables(
            host_ns,
            &["-D", "FORWARD", "-i", &veth, "-o", UPLINK, "-j", "ACCEPT"],
        ),
        iptables(
            host_ns,
            &["-D", "FORWARD", "-i", UPLINK, "-o", &veth, "-j", "ACCEPT"],
        ),
        iptables(
            host_ns,
            &[
                "-t",
                "nat",
                "-D",
                "POSTROUTING",
                "-s",
                &format!("{vpeer_ip}/32"),
                "-o",
                UPLINK,
                "-j",
                "MASQUERADE",
            ],
        ),
        ip_in(
            host_ns,
            &["route", "del", &format!("{host_ip}/32"), "via", &vpeer_ip],
        ),
        ip_in(host_ns, &["link", "del", &veth]),
        ip(&["netns", "del", &ns]),
    ];
    let delete_ms = t1.elapsed().as_secs_f64() * 1e3;
    create?;
    for s in steps {
        s?;
    }
    Ok(SeedTiming {
        create_ms,
        create_subprocess_ms: sub.as_secs_f64() * 1e3,
        delete_ms,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seed_addressing_carries() {
        let (h, v, p) = seed_addrs(300);
        assert_eq!(h, Ipv4Addr::new(10, 11, 1, 44));
        assert_eq!(v, Ipv4Addr::new(10, 12, 2, 88));
        assert_eq!(p, Ipv4Addr::new(10, 12, 2, 89));
    }
}
