//! Program cost: `BPF_PROG_TEST_RUN` (through `bpftool prog run`) on the
//! programs the running agent loaded, each fed a frame that takes its main
//! path, run inside the namespace the program serves with the ifindex of the
//! device it is attached to in the `__sk_buff` context (`tap_ingress` finds
//! its slot from `tap0`'s, `veth_ingress` from the host veth's, and the
//! kernel resolves it in the caller's namespace).
//!
//! A test run with a repeat count runs the program again and again on the
//! *same* skb, so a program that rewrites the packet measures its own output
//! from the second run on (a translated packet is no longer the flow's and
//! takes the pass-through path). Only a case whose output equals its input
//! (`tap_ingress`, the pass-through case) is timed with a repeat count; every
//! translating case is the median of many single runs, each on a fresh copy
//! of the frame, issued back to back from one `bpftool batch` (a run's time
//! includes one clock read of the kernel's timer).
//! Every run of a case is checked: the verdict it must return
//! (`TC_ACT_REDIRECT`, 7, for a redirect: a test run reports the helper's
//! verdict without performing it; `TC_ACT_OK`, 0, for a pass) and the rewrite
//! in its output frame.

use std::collections::HashMap;
use std::net::Ipv4Addr;
use std::process::Command;
use std::time::Duration;

use anyhow::{Context, Result, bail};

use super::Plan;
use super::agent::Agent;
use super::proc::{ns_cmd, run_bounded};
use super::topology::{GUEST_IP, HOST_IP, Run, SERVER_IP, UPLINK, UPLINK_IP, VETH_IP, VPEER_IP};

/// ns per packet of one program on one crafted frame.
#[derive(Debug, Clone)]
pub struct ProgCost {
    pub program: String,
    pub case: String,
    pub ns_per_packet: f64,
    /// The return value BPF_PROG_TEST_RUN reported (of the last run).
    pub verdict: i64,
    /// Whether every run returned the intended verdict and its output frame
    /// shows the rewrite of the intended path (or, for the pass-through case,
    /// is unchanged).
    pub took_path: bool,
}

/// Offset of `ifindex` in `struct __sk_buff`.
const SKB_IFINDEX_OFFSET: usize = 40;
/// Offset of `mark` in `struct __sk_buff`.
const SKB_MARK_OFFSET: usize = 8;
const TAP_MAC: [u8; 6] = [0x02, 0xfc, 0, 0, 0, 5];
/// `tap0` of slot N has ifindex `SLOT_TAP_IFINDEX_BASE + N` (netagent-common).
const SLOT_TAP_IFINDEX_BASE: u32 = 1 << 20;
/// `skb->mark` of a reply `uplink_ingress` translated for the guest, plus the
/// slot (netagent-common's `TO_GUEST_MARK`).
const TO_GUEST_MARK: u32 = 0x6e61_0000;
const TC_ACT_OK: i64 = 0;
const TC_ACT_REDIRECT: i64 = 7;
/// The guest's crafted flow; the slot namespace's own flow uses another port,
/// so the two never share a masquerade entry.
const GUEST_PORT: u16 = 40000;
const VPEER_PORT: u16 = 40001;
const SERVER_PORT: u16 = 5201;

/// One way of timing a case.
#[derive(Clone, Copy)]
enum Timing {
    /// One test run with this repeat count (the program leaves the frame as
    /// it is).
    Repeat(u32),
    /// The median of this many single runs (the program rewrites the frame).
    Singles(u32),
}

pub fn measure(run: &Run, agent: &Agent, plan: &Plan) -> Result<Vec<ProgCost>> {
    let ids = prog_ids(agent.pid())?;
    let id = |name: &str| -> Result<u32> {
        ids.get(name)
            .copied()
            .with_context(|| format!("the agent has no program {name} loaded (found {ids:?})"))
    };
    let repeat = Timing::Repeat(if plan.quick { 100_000 } else { 2_000_000 });
    let singles = Timing::Singles(if plan.quick { 40 } else { 200 });
    let slot_ns = agent.slot_ns(1);
    let guest_ns = run.ns('n', 'g');
    let veth = slot_veth_name(agent)?;
    let veth_ifindex = ifindex(&agent.host_ns, &veth)?;
    let uplink_ifindex = ifindex(&agent.host_ns, UPLINK)?;
    let tap_ifindex = ifindex(&slot_ns, "tap0")?;
    if tap_ifindex != SLOT_TAP_IFINDEX_BASE + 1 {
        bail!("slot 1's tap0 has ifindex {tap_ifindex}, not SLOT_TAP_IFINDEX_BASE + 1");
    }
    // The guest's real MAC (what `veth_ingress` learns from its frames), so
    // the crafted frames teach the datapath nothing the real traffic would not.
    let guest_mac = mac(&guest_ns, "eth0")?;
    let guest: Ipv4Addr = GUEST_IP.parse()?;
    let server: Ipv4Addr = SERVER_IP.parse()?;
    let vpeer: Ipv4Addr = VPEER_IP.parse()?;
    let veth: Ipv4Addr = VETH_IP.parse()?;
    let host_ip: Ipv4Addr = HOST_IP.parse()?;
    let uplink: Ipv4Addr = UPLINK_IP.parse()?;
    let mac = [0x02, 0, 0, 0, 0, 1];
    let dir = &run.dir;
    let mut out = Vec::new();
    let mut case = |program: &str,
                    what: &str,
                    ns: &str,
                    ctx: SkbCtx,
                    frame: &[u8],
                    timing: Timing,
                    check: &dyn Fn(i64, &[u8]) -> bool|
     -> Result<Vec<u8>> {
        let prog = id(program)?;
        let (ns_per_packet, verdict, took_path, data, how) = match timing {
            Timing::Repeat(n) => {
                let (v, t, data) = prog_run(dir, ns, prog, frame, ctx, n)?;
                (t, v, check(v, &data), data, format!("repeat {n}"))
            }
            Timing::Singles(n) => {
                let runs = prog_run_singles(dir, ns, prog, frame, ctx, n)?;
                let ok = runs.iter().all(|(v, _, data)| check(*v, data));
                let mut times: Vec<f64> = runs.iter().map(|r| r.1).collect();
                times.sort_by(f64::total_cmp);
                let median = times[times.len() / 2];
                let (v, _, data) = runs.into_iter().last().context("no runs")?;
                (median, v, ok, data, format!("median of {n} single runs"))
            }
        };
        out.push(ProgCost {
            program: program.into(),
            case: format!("{what} ({how})"),
            ns_per_packet,
            verdict,
            took_path,
        });
        Ok(data)
    };

    // The guest's frame on tap0: checked, handed on untouched.
    let frame = tcp_frame(TAP_MAC, guest_mac, guest, server, GUEST_PORT, SERVER_PORT);
    case(
        "tap_ingress",
        "guest → world TCP on slot 1's tap0 (checks, redirect_peer, frame untouched)",
        &slot_ns,
        SkbCtx::on(tap_ifindex),
        &frame,
        repeat,
        &|v, data| v == TC_ACT_REDIRECT && data == frame,
    )?;

    // A masqueraded flow of `frame`, allocated (and the guest's L2 learned) by
    // a first run, then timed; returns its masquerade port.
    let mut masquerade = |what: &'static str, frame: &[u8]| -> Result<u16> {
        let first = prog_run(
            dir,
            &agent.host_ns,
            id("veth_ingress")?,
            frame,
            SkbCtx::on(veth_ifindex),
            1,
        )?;
        let port = port_at(&first.2, 34).context("veth_ingress output too short")?;
        case(
            "veth_ingress",
            what,
            &agent.host_ns,
            SkbCtx::on(veth_ifindex),
            frame,
            singles,
            &|v, data| {
                v == TC_ACT_REDIRECT
                    && addr_at(data, 26) == Some(uplink)
                    && port_at(data, 34) == Some(port)
            },
        )?;
        Ok(port)
    };
    // The slot namespace's own flow.
    let vpeer_port = masquerade(
        "vpeer → world TCP, flow known (masquerade, next hop, out by the uplink)",
        &tcp_frame(mac, mac, vpeer, server, VPEER_PORT, SERVER_PORT),
    )?;
    // The guest's flow: the fast path.
    let guest_port = masquerade(
        "guest → world TCP, established flow (fast path: masquerade, next hop, out by the uplink)",
        &tcp_frame(TAP_MAC, guest_mac, guest, server, GUEST_PORT, SERVER_PORT),
    )?;

    // The guest's MACs are known (learned above), so the reply is translated
    // for the guest here, addressed to it and marked for the slot.
    let frame = tcp_frame(mac, mac, server, uplink, SERVER_PORT, guest_port);
    let reply = case(
        "uplink_ingress",
        "world → guest TCP reply, guest L2 known (reverse NAT to the guest, MACs, mark, redirect_peer)",
        &agent.host_ns,
        SkbCtx::on(uplink_ifindex),
        &frame,
        singles,
        &|v, data| {
            v == TC_ACT_REDIRECT
                && addr_at(data, 30) == Some(guest)
                && port_at(data, 36) == Some(GUEST_PORT)
                && data.get(0..6) == Some(&guest_mac[..])
        },
    )?;

    // A reply of the slot namespace's own flow: to the vpeer address, unmarked.
    let frame = tcp_frame(mac, mac, server, uplink, SERVER_PORT, vpeer_port);
    case(
        "uplink_ingress",
        "world → slot namespace TCP reply (reverse NAT to the vpeer address, redirect_peer)",
        &agent.host_ns,
        SkbCtx::on(uplink_ifindex),
        &frame,
        singles,
        &|v, data| {
            v == TC_ACT_REDIRECT
                && addr_at(data, 30) == Some(vpeer)
                && port_at(data, 36) == Some(VPEER_PORT)
        },
    )?;

    let frame = tcp_frame(mac, mac, server, uplink, SERVER_PORT, 22);
    case(
        "uplink_ingress",
        "host's own TCP traffic (untouched, TC_ACT_OK)",
        &agent.host_ns,
        SkbCtx::on(uplink_ifindex),
        &frame,
        repeat,
        &|v, data| v == TC_ACT_OK && data == frame,
    )?;

    // That reply on the slot's eth0: passed on as it is (the program clears
    // the mark, so a repeat would time another path: single runs).
    case(
        "slot_ingress",
        "world → guest TCP reply, translated and marked on the uplink (passed on, redirect)",
        &slot_ns,
        SkbCtx {
            ifindex: None,
            mark: TO_GUEST_MARK | 1,
        },
        &reply,
        singles,
        &|v, data| v == TC_ACT_REDIRECT && data == reply,
    )?;

    // The host reaches the guest at HostIP: a tracked flow (made by the first
    // run), translated here, addressed to the guest's known MACs, bpf_redirect.
    let frame = tcp_frame(mac, mac, veth, host_ip, SERVER_PORT, GUEST_PORT);
    case(
        "slot_ingress",
        "host → guest TCP to HostIP, flow tracked, guest L2 known (DNAT to guest, MACs, redirect)",
        &slot_ns,
        SkbCtx::default(),
        &frame,
        singles,
        &|v, data| {
            v == TC_ACT_REDIRECT
                && addr_at(data, 30) == Some(guest)
                && data.get(0..6) == Some(&guest_mac[..])
                && data.get(6..12) == Some(&TAP_MAC[..])
        },
    )?;

    // The host reaches the slot namespace at the vpeer address: no flow of
    // the guest's, so it passes to that namespace's stack.
    let frame = tcp_frame(mac, mac, veth, vpeer, SERVER_PORT, 22);
    case(
        "slot_ingress",
        "host → slot namespace TCP to the vpeer address (no guest flow: untouched, TC_ACT_OK)",
        &slot_ns,
        SkbCtx::default(),
        &frame,
        repeat,
        &|v, data| v == TC_ACT_OK && data == frame,
    )?;
    Ok(out)
}

/// A port (big-endian) at `at` of an output frame: 34 the TCP source, 36 the
/// destination (IPv4 header without options).
fn port_at(frame: &[u8], at: usize) -> Option<u16> {
    frame
        .get(at..at + 2)
        .map(|b| u16::from_be_bytes([b[0], b[1]]))
}

/// The MAC of `dev` in namespace `ns`.
fn mac(ns: &str, dev: &str) -> Result<[u8; 6]> {
    let out = run_bounded(
        Command::new("ip").args(["-n", ns, "-o", "link", "show", "dev", dev]),
        Duration::from_secs(5),
    )?;
    let text = out
        .stdout
        .split_whitespace()
        .skip_while(|w| *w != "link/ether")
        .nth(1)
        .with_context(|| format!("no MAC for {dev} in {ns}"))?;
    let bytes: Vec<u8> = text
        .split(':')
        .map(|h| u8::from_str_radix(h, 16))
        .collect::<Result<_, _>>()
        .with_context(|| format!("bad MAC {text}"))?;
    bytes
        .try_into()
        .map_err(|_| anyhow::anyhow!("bad MAC {text}"))
}

/// The IPv4 source (`at` = 26) or destination (`at` = 30) of an output frame.
fn addr_at(frame: &[u8], at: usize) -> Option<Ipv4Addr> {
    frame
        .get(at..at + 4)
        .map(|b| Ipv4Addr::new(b[0], b[1], b[2], b[3]))
}

/// Program name → id of the programs the process holds (prog and link fds).
fn prog_ids(pid: u32) -> Result<HashMap<String, u32>> {
    let mut ids = Vec::new();
    for e in std::fs::read_dir(format!("/proc/{pid}/fdinfo"))?.flatten() {
        let Ok(info) = std::fs::read_to_string(e.path()) else {
            continue;
        };
        if let Some(id) = info
            .lines()
            .find_map(|l| l.strip_prefix("prog_id:"))
            .and_then(|v| v.trim().parse::<u32>().ok())
        {
            ids.push(id);
        }
    }
    ids.sort_unstable();
    ids.dedup();
    let mut by_name = HashMap::new();
    for id in ids {
        let out = run_bounded(
            Command::new("bpftool").args(["prog", "show", "id", &id.to_string()]),
            Duration::from_secs(10),
        )?;
        if let Some(name) = out
            .stdout
            .split_whitespace()
            .skip_while(|w| *w != "name")
            .nth(1)
        {
            // Ids ascend: the last one is the newest instance (slot 1's own
            // instance where the agent loads per-slot copies).
            by_name.insert(name.to_string(), id);
        }
    }
    Ok(by_name)
}

fn slot_veth_name(agent: &Agent) -> Result<String> {
    let a = agent.request("GET", "/v1/slots/1", None)?;
    let key = "\"veth\":\"";
    let at = a.body.find(key).context("slot 1 has no veth in its JSON")?;
    let rest = &a.body[at + key.len()..];
    Ok(rest[..rest.find('"').context("bad JSON")?].to_string())
}

fn ifindex(ns: &str, dev: &str) -> Result<u32> {
    let out = run_bounded(
        Command::new("ip").args(["-n", ns, "-o", "link", "show", "dev", dev]),
        Duration::from_secs(5),
    )?;
    out.stdout
        .split(':')
        .next()
        .and_then(|v| v.trim().parse().ok())
        .with_context(|| format!("no ifindex for {dev} in {ns}"))
}

/// The `__sk_buff` fields a test run is given.
#[derive(Debug, Clone, Copy, Default)]
struct SkbCtx {
    /// The device the skb arrives on (`None`: the namespace's loopback).
    ifindex: Option<u32>,
    /// `skb->mark`.
    mark: u32,
}

impl SkbCtx {
    fn on(ifindex: u32) -> SkbCtx {
        SkbCtx {
            ifindex: Some(ifindex),
            mark: 0,
        }
    }

    /// The `ctx_in` file of program `id` for these fields, if any is set.
    fn file(self, dir: &std::path::Path, id: u32) -> Result<Option<std::path::PathBuf>> {
        if self.ifindex.is_none() && self.mark == 0 {
            return Ok(None);
        }
        let mut ctx = vec![0u8; SKB_IFINDEX_OFFSET + 4];
        ctx[SKB_MARK_OFFSET..SKB_MARK_OFFSET + 4].copy_from_slice(&self.mark.to_ne_bytes());
        ctx[SKB_IFINDEX_OFFSET..].copy_from_slice(&self.ifindex.unwrap_or(0).to_ne_bytes());
        let path = dir.join(format!("prog-{id}.ctx"));
        std::fs::write(&path, ctx)?;
        Ok(Some(path))
    }
}

/// Runs `bpftool prog run` `repeat` times; returns (verdict, ns per run, frame out).
fn prog_run(
    dir: &std::path::Path,
    ns: &str,
    id: u32,
    frame: &[u8],
    ctx: SkbCtx,
    repeat: u32,
) -> Result<(i64, f64, Vec<u8>)> {
    let data_in = dir.join(format!("prog-{id}.in"));
    let data_out = dir.join(format!("prog-{id}.out"));
    std::fs::write(&data_in, frame)?;
    let mut cmd = ns_cmd(ns, "bpftool");
    cmd.args(["prog", "run", "id", &id.to_string(), "data_in"])
        .arg(&data_in)
        .arg("data_out")
        .arg(&data_out)
        .args(["data_size_out", "2048"]);
    if let Some(ctx_in) = ctx.file(dir, id)? {
        cmd.arg("ctx_in").arg(ctx_in);
    }
    cmd.args(["repeat", &repeat.to_string()]);
    let out = run_bounded(&mut cmd, Duration::from_secs(120))?;
    let text = format!("{}{}", out.stdout, out.stderr);
    let (verdict, ns) = parse_run(&text)?;
    let data = std::fs::read(&data_out).unwrap_or_default();
    Ok((verdict, ns, data))
}

/// The return value and ns per run of one `bpftool prog run` answer ("Return
/// value: 7, duration: 812ns" for one run, "duration (average): …" for more).
fn parse_run(text: &str) -> Result<(i64, f64)> {
    let verdict = text
        .split("Return value:")
        .nth(1)
        .and_then(|r| r.split(',').next())
        .and_then(|v| v.trim().parse().ok());
    let ns = text
        .split("duration")
        .nth(1)
        .and_then(|r| r.split(':').nth(1))
        .and_then(|r| r.trim().split("ns").next())
        .and_then(|v| v.trim().parse().ok());
    match (verdict, ns) {
        (Some(v), Some(ns)) => Ok((v, ns)),
        _ => bail!("unexpected bpftool output: {text}"),
    }
}

/// `n` single test runs, each on a fresh copy of `frame`, from one `bpftool
/// batch` (one process, so the runs follow each other closely and find the
/// program and maps in cache); returns (verdict, ns, frame out) of each.
fn prog_run_singles(
    dir: &std::path::Path,
    ns: &str,
    id: u32,
    frame: &[u8],
    ctx: SkbCtx,
    n: u32,
) -> Result<Vec<(i64, f64, Vec<u8>)>> {
    let data_in = dir.join(format!("prog-{id}.in"));
    std::fs::write(&data_in, frame)?;
    let ctx = match ctx.file(dir, id)? {
        Some(ctx_in) => format!(" ctx_in {}", ctx_in.display()),
        None => String::new(),
    };
    let outs: Vec<std::path::PathBuf> = (0..n)
        .map(|k| dir.join(format!("prog-{id}-{k}.out")))
        .collect();
    let cmds: String = outs
        .iter()
        .map(|out| {
            format!(
                "prog run id {id} data_in {} data_out {} data_size_out 2048{ctx} repeat 1\n",
                data_in.display(),
                out.display()
            )
        })
        .collect();
    let batch = dir.join(format!("prog-{id}.batch"));
    std::fs::write(&batch, cmds)?;
    let mut cmd = ns_cmd(ns, "bpftool");
    cmd.args(["batch", "file"]).arg(&batch);
    let out = run_bounded(&mut cmd, Duration::from_secs(300))?;
    let text = format!("{}{}", out.stdout, out.stderr);
    let answers: Vec<&str> = text.split("Return value:").skip(1).collect();
    if answers.len() != n as usize {
        bail!(
            "bpftool batch answered {} of {n} runs: {text}",
            answers.len()
        );
    }
    let mut runs = Vec::with_capacity(n as usize);
    for (answer, path) in answers.iter().zip(&outs) {
        let (v, ns) = parse_run(&format!("Return value:{answer}"))?;
        let data = std::fs::read(path).unwrap_or_default();
        let _ = std::fs::remove_file(path);
        runs.push((v, ns, data));
    }
    Ok(runs)
}

fn csum(data: &[u8], initial: u32) -> u16 {
    let mut sum = initial;
    for chunk in data.chunks(2) {
        let word = if chunk.len() == 2 {
            u16::from_be_bytes([chunk[0], chunk[1]])
        } else {
            u16::from_be_bytes([chunk[0], 0])
        };
        sum += u32::from(word);
    }
    while sum >> 16 != 0 {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// Ethernet + IPv4 + TCP (ACK, 64 bytes of payload) with valid checksums.
pub fn tcp_frame(
    dst_mac: [u8; 6],
    src_mac: [u8; 6],
    src: Ipv4Addr,
    dst: Ipv4Addr,
    sport: u16,
    dport: u16,
) -> Vec<u8> {
    let payload = [0x42u8; 64];
    let tcp_len = 20 + payload.len();
    let mut f = Vec::with_capacity(14 + 20 + tcp_len);
    f.extend_from_slice(&dst_mac);
    f.extend_from_slice(&src_mac);
    f.extend_from_slice(&0x0800u16.to_be_bytes());
    let mut ip = [0u8; 20];
    ip[0] = 0x45;
    ip[2..4].copy_from_slice(&((20 + tcp_len) as u16).to_be_bytes());
    ip[4..6].copy_from_slice(&0x1234u16.to_be_bytes());
    ip[6] = 0x40; // DF
    ip[8] = 64;
    ip[9] = 6;
    ip[12..16].copy_from_slice(&src.octets());
    ip[16..20].copy_from_slice(&dst.octets());
    let c = csum(&ip, 0);
    ip[10..12].copy_from_slice(&c.to_be_bytes());
    f.extend_from_slice(&ip);
    let mut tcp = vec![0u8; 20];
    tcp[0..2].copy_from_slice(&sport.to_be_bytes());
    tcp[2..4].copy_from_slice(&dport.to_be_bytes());
    tcp[4..8].copy_from_slice(&1000u32.to_be_bytes());
    tcp[8..12].copy_from_slice(&2000u32.to_be_bytes());
    tcp[12] = 5 << 4;
    tcp[13] = 0x10; // ACK
    tcp[14..16].copy_from_slice(&65535u16.to_be_bytes());
    tcp.extend_from_slice(&payload);
    let mut pseudo = 0u32;
    for w in [src.octets(), dst.octets()] {
        pseudo += u32::from(u16::from_be_bytes([w[0], w[1]]))
            + u32::from(u16::from_be_bytes([w[2], w[3]]));
    }
    pseudo += 6 + tcp_len as u32;
    let c = csum(&tcp, pseudo);
    tcp[16..18].copy_from_slice(&c.to_be_bytes());
    f.extend_from_slice(&tcp);
    f
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bpftool_answers_parse() {
        assert_eq!(
            parse_run("Return value: 7, duration: 7215ns\n").unwrap(),
            (7, 7215.0)
        );
        assert_eq!(
            parse_run("Return value: 0, duration (average): 38ns\n").unwrap(),
            (0, 38.0)
        );
        assert!(parse_run("Error: bad").is_err());
    }

    #[test]
    fn frame_checksums_verify() {
        let f = tcp_frame(
            [0; 6],
            [0; 6],
            Ipv4Addr::new(169, 254, 0, 21),
            Ipv4Addr::new(198, 18, 0, 2),
            40000,
            5201,
        );
        assert_eq!(csum(&f[14..34], 0), 0);
        let mut pseudo = 0u32;
        for w in [[169u8, 254, 0, 21], [198, 18, 0, 2]] {
            pseudo += u32::from(u16::from_be_bytes([w[0], w[1]]))
                + u32::from(u16::from_be_bytes([w[2], w[3]]));
        }
        pseudo += 6 + (f.len() - 34) as u32;
        assert_eq!(csum(&f[34..], pseudo), 0);
    }
}
