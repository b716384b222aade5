//! Program cost: `BPF_PROG_TEST_RUN` with a repeat count (through `bpftool prog
//! run`) on the programs the running agent loaded, each fed a frame that takes its
//! main path. Runs inside the namespace the program serves (the slot programs look
//! the slot up by netns cookie) and, for the host-side programs, with the ifindex
//! of the device they are attached to in the `__sk_buff` context.

use std::collections::HashMap;
use std::net::Ipv4Addr;
use std::process::Command;
use std::time::Duration;

use anyhow::{Context, Result, bail};

use super::Plan;
use super::agent::Agent;
use super::proc::{ns_cmd, run_bounded};
use super::topology::{GUEST_IP, Run, SERVER_IP, UPLINK, UPLINK_IP, VPEER_IP};

/// ns per packet of one program on one crafted frame.
#[derive(Debug, Clone)]
pub struct ProgCost {
    pub program: String,
    pub case: String,
    pub ns_per_packet: f64,
    /// The return value BPF_PROG_TEST_RUN reported.
    pub verdict: i64,
    /// Whether the output frame shows the rewrite of the intended path (or, for
    /// the pass-through case, is unchanged).
    pub took_path: bool,
}

/// Offset of `ifindex` in `struct __sk_buff`.
const SKB_IFINDEX_OFFSET: usize = 40;
const TAP_MAC: [u8; 6] = [0x02, 0xfc, 0, 0, 0, 5];
const GUEST_PORT: u16 = 40000;
const SERVER_PORT: u16 = 5201;

pub fn measure(run: &Run, agent: &Agent, plan: &Plan) -> Result<Vec<ProgCost>> {
    let ids = prog_ids(agent.pid())?;
    let id = |name: &str| -> Result<u32> {
        ids.get(name)
            .copied()
            .with_context(|| format!("the agent has no program {name} loaded (found {ids:?})"))
    };
    let repeat: u32 = if plan.quick { 100_000 } else { 2_000_000 };
    let slot_ns = agent.slot_ns(1);
    let veth = slot_veth_name(agent)?;
    let veth_ifindex = ifindex(&agent.host_ns, &veth)?;
    let uplink_ifindex = ifindex(&agent.host_ns, UPLINK)?;
    let guest: Ipv4Addr = GUEST_IP.parse()?;
    let server: Ipv4Addr = SERVER_IP.parse()?;
    let vpeer: Ipv4Addr = VPEER_IP.parse()?;
    let uplink: Ipv4Addr = UPLINK_IP.parse()?;
    let mac = [0x02, 0, 0, 0, 0, 1];
    let dir = &run.dir;
    let mut out = Vec::new();

    let frame = tcp_frame(TAP_MAC, mac, guest, server, GUEST_PORT, SERVER_PORT);
    let (v, ns, data) = prog_run(dir, &slot_ns, id("tap_ingress")?, &frame, None, repeat)?;
    out.push(cost(
        "tap_ingress",
        "guest → world TCP (SNAT to vpeer, redirect_peer)",
        ns,
        v,
        addr_at(&data, 26) == Some(vpeer),
    ));

    let frame = tcp_frame(mac, mac, vpeer, server, GUEST_PORT, SERVER_PORT);
    let (v, ns, data) = prog_run(
        dir,
        &agent.host_ns,
        id("veth_ingress")?,
        &frame,
        Some(veth_ifindex),
        repeat,
    )?;
    out.push(cost(
        "veth_ingress",
        "vpeer → world TCP, flow known after the first run (masquerade, redirect_neigh)",
        ns,
        v,
        addr_at(&data, 26) == Some(uplink),
    ));
    // The masquerade port the program chose, to address the reply.
    let port = data
        .get(34..36)
        .map(|b| u16::from_be_bytes([b[0], b[1]]))
        .context("veth_ingress output too short")?;

    let frame = tcp_frame(mac, mac, server, uplink, SERVER_PORT, port);
    let (v, ns, data) = prog_run(
        dir,
        &agent.host_ns,
        id("uplink_ingress")?,
        &frame,
        Some(uplink_ifindex),
        repeat,
    )?;
    out.push(cost(
        "uplink_ingress",
        "world → slot TCP reply (reverse NAT, redirect_peer)",
        ns,
        v,
        addr_at(&data, 30) == Some(vpeer),
    ));

    let frame = tcp_frame(mac, mac, server, uplink, SERVER_PORT, 22);
    let (v, ns, data) = prog_run(
        dir,
        &agent.host_ns,
        id("uplink_ingress")?,
        &frame,
        Some(uplink_ifindex),
        repeat,
    )?;
    out.push(cost(
        "uplink_ingress",
        "host's own TCP traffic (untouched, TC_ACT_OK)",
        ns,
        v,
        data == frame,
    ));

    let frame = tcp_frame(mac, mac, server, vpeer, SERVER_PORT, GUEST_PORT);
    let (v, ns, data) = prog_run(dir, &slot_ns, id("slot_ingress")?, &frame, None, repeat)?;
    out.push(cost(
        "slot_ingress",
        "world → guest TCP (DNAT to guest, redirect_neigh)",
        ns,
        v,
        addr_at(&data, 30) == Some(guest),
    ));
    Ok(out)
}

fn cost(program: &str, case: &str, ns: f64, verdict: i64, took_path: bool) -> ProgCost {
    ProgCost {
        program: program.into(),
        case: case.into(),
        ns_per_packet: ns,
        verdict,
        took_path,
    }
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

/// Runs `bpftool prog run` `repeat` times; returns (verdict, ns per run, frame out).
fn prog_run(
    dir: &std::path::Path,
    ns: &str,
    id: u32,
    frame: &[u8],
    ifindex: Option<u32>,
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
    if let Some(ifindex) = ifindex {
        let mut ctx = vec![0u8; SKB_IFINDEX_OFFSET + 4];
        ctx[SKB_IFINDEX_OFFSET..].copy_from_slice(&ifindex.to_ne_bytes());
        let ctx_in = dir.join(format!("prog-{id}.ctx"));
        std::fs::write(&ctx_in, ctx)?;
        cmd.arg("ctx_in").arg(ctx_in);
    }
    cmd.args(["repeat", &repeat.to_string()]);
    let out = run_bounded(&mut cmd, Duration::from_secs(120))?;
    let text = format!("{}{}", out.stdout, out.stderr);
    let verdict = text
        .split("Return value:")
        .nth(1)
        .and_then(|r| r.split(',').next())
        .and_then(|v| v.trim().parse().ok());
    let ns = text
        .split("duration (average):")
        .nth(1)
        .and_then(|r| r.trim().split("ns").next())
        .and_then(|v| v.trim().parse().ok());
    let (Some(verdict), Some(ns)) = (verdict, ns) else {
        bail!("unexpected bpftool output: {text}");
    };
    let data = std::fs::read(&data_out).unwrap_or_default();
    Ok((verdict, ns, data))
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
