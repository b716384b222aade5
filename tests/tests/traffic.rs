//! Traffic through a slot, end to end in a throwaway world: a guest behind the TAP
//! (a frame pump standing in for the VMM) or behind a veth guest link reaches the
//! wan servers over TCP, UDP and ICMP and the wan sees the uplink address; the host
//! reaches a guest service at HostIP and the replies come from HostIP; per-slot
//! counters match the packets sent exactly. Each path runs with checksum offload on
//! (virtio-net headers through the pump, partial checksums) and off (every receiver
//! verifies every checksum in software).

use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4, TcpListener, TcpStream, UdpSocket};
use std::os::fd::FromRawFd;
use std::time::Duration;

use anyhow::{Context, Result, bail, ensure};
use netagent::slot::{GuestLink, SlotAddr};
use netagent_common::Counter;
use netagent_tests::pump::{Offload, Pump};
use netagent_tests::world::{
    Agent, TCP_ECHO_PORT, UDP_ECHO_PORT, UPLINK_IP, WAN_IP, World, set_checksum_offload,
};

const TIMEOUT: Duration = Duration::from_secs(5);
/// A guest-side service the host reaches at HostIP.
const GUEST_TCP_PORT: u16 = 8080;
const GUEST_UDP_PORT: u16 = 8081;

/// TCP to the wan echo server from inside `ns`: sends `len` bytes, reads them back.
fn tcp_echo(world: &World, ns: &str, len: usize) -> Result<SocketAddr> {
    world.in_ns(ns, move || -> Result<SocketAddr> {
        let mut s =
            TcpStream::connect_timeout(&SocketAddrV4::new(WAN_IP, TCP_ECHO_PORT).into(), TIMEOUT)
                .context("connect to the wan echo server")?;
        s.set_read_timeout(Some(TIMEOUT))?;
        let data: Vec<u8> = (0..len).map(|i| (i * 7 % 251) as u8).collect();
        let mut w = s.try_clone()?;
        let sent = data.clone();
        let writer = std::thread::spawn(move || w.write_all(&sent));
        let mut back = vec![0u8; len];
        s.read_exact(&mut back).context("read the echo")?;
        writer.join().expect("writer")?;
        ensure!(back == data, "echoed bytes differ");
        Ok(s.local_addr()?)
    })?
}

/// `count` UDP datagrams of `payload` bytes to the wan echo server, each waited
/// for; returns the source address the replies came from.
fn udp_echo(world: &World, ns: &str, count: usize, payload: usize) -> Result<Vec<SocketAddr>> {
    world.in_ns(ns, move || -> Result<Vec<SocketAddr>> {
        let s = UdpSocket::bind("0.0.0.0:0")?;
        s.set_read_timeout(Some(TIMEOUT))?;
        let mut from = Vec::new();
        for i in 0..count {
            let msg: Vec<u8> = (0..payload).map(|j| (i + j) as u8).collect();
            s.send_to(&msg, SocketAddrV4::new(WAN_IP, UDP_ECHO_PORT))?;
            let mut buf = [0u8; 2048];
            let (n, peer) = s
                .recv_from(&mut buf)
                .with_context(|| format!("udp echo {i}"))?;
            ensure!(buf[..n] == msg[..], "udp echo {i} differs");
            from.push(peer);
        }
        Ok(from)
    })?
}

fn checksum(data: &[u8]) -> u16 {
    let mut sum = 0u32;
    for chunk in data.chunks(2) {
        let word = if chunk.len() == 2 {
            u16::from_be_bytes([chunk[0], chunk[1]])
        } else {
            u16::from_be_bytes([chunk[0], 0])
        };
        sum += u32::from(word);
    }
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// `count` ICMP echo requests (identifier `id`, `payload` bytes) to `dst` from
/// inside `ns` over a raw socket, each waited for.
fn ping(world: &World, ns: &str, dst: Ipv4Addr, id: u16, count: u16, payload: usize) -> Result<()> {
    world.in_ns(ns, move || -> Result<()> {
        // SAFETY: plain socket(2); the result is checked before use.
        let fd = unsafe {
            libc::socket(
                libc::AF_INET,
                libc::SOCK_RAW | libc::SOCK_CLOEXEC,
                libc::IPPROTO_ICMP,
            )
        };
        if fd < 0 {
            bail!("raw socket: {}", std::io::Error::last_os_error());
        }
        // SAFETY: `fd` was just created and is owned by nothing else; the UdpSocket
        // takes ownership and is only used for sendto/recvfrom, which raw sockets
        // support with the same semantics.
        let sock = unsafe { UdpSocket::from_raw_fd(fd) };
        sock.set_read_timeout(Some(TIMEOUT))?;
        for seq in 0..count {
            let mut pkt = vec![8u8, 0, 0, 0];
            pkt.extend_from_slice(&id.to_be_bytes());
            pkt.extend_from_slice(&seq.to_be_bytes());
            pkt.extend((0..payload).map(|i| i as u8));
            let c = checksum(&pkt);
            pkt[2..4].copy_from_slice(&c.to_be_bytes());
            sock.send_to(&pkt, SocketAddrV4::new(dst, 0))?;
            let deadline = std::time::Instant::now() + TIMEOUT;
            loop {
                ensure!(
                    std::time::Instant::now() < deadline,
                    "no echo reply {seq} from {dst}"
                );
                let mut buf = [0u8; 2048];
                let (n, _) = sock
                    .recv_from(&mut buf)
                    .with_context(|| format!("echo reply {seq}"))?;
                let ihl = usize::from(buf[0] & 0x0f) * 4;
                let icmp = &buf[ihl..n];
                let src = Ipv4Addr::new(buf[12], buf[13], buf[14], buf[15]);
                if icmp.len() >= 8
                    && icmp[0] == 0
                    && src == dst
                    && u16::from_be_bytes([icmp[4], icmp[5]]) == id
                    && u16::from_be_bytes([icmp[6], icmp[7]]) == seq
                {
                    ensure!(checksum(icmp) == 0, "bad ICMP checksum in echo reply");
                    ensure!(icmp[8..] == pkt[8..], "echo payload differs");
                    break;
                }
            }
        }
        Ok(())
    })?
}

/// Starts TCP and UDP echo services of the guest on 169.254.0.21 inside `ns`.
/// Each returns the peers it saw through the channel.
fn guest_services(world: &World, ns: &str) -> Result<std::sync::mpsc::Receiver<SocketAddr>> {
    let guest = Ipv4Addr::new(169, 254, 0, 21);
    let (tcp, udp) = world.in_ns(ns, move || -> Result<(TcpListener, UdpSocket)> {
        Ok((
            TcpListener::bind(SocketAddrV4::new(guest, GUEST_TCP_PORT))?,
            UdpSocket::bind(SocketAddrV4::new(guest, GUEST_UDP_PORT))?,
        ))
    })??;
    let (tx, rx) = std::sync::mpsc::channel();
    let tx2 = tx.clone();
    std::thread::spawn(move || {
        while let Ok((mut c, peer)) = tcp.accept() {
            let _ = tx.send(peer);
            let mut buf = [0u8; 4096];
            while let Ok(n) = c.read(&mut buf) {
                if n == 0 || c.write_all(&buf[..n]).is_err() {
                    break;
                }
            }
        }
    });
    std::thread::spawn(move || {
        udp.set_read_timeout(Some(Duration::from_secs(30))).ok();
        let mut buf = [0u8; 4096];
        while let Ok((n, peer)) = udp.recv_from(&mut buf) {
            let _ = tx2.send(peer);
            let _ = udp.send_to(&buf[..n], peer);
        }
    });
    Ok(rx)
}

/// The host reaches the guest at HostIP over TCP and UDP; replies come from HostIP.
fn host_reaches_guest(world: &World, slot: &SlotAddr, guest_ns: &str) -> Result<()> {
    let seen = guest_services(world, guest_ns)?;
    let host_ip = slot.host_ip;
    let (tcp_local, udp_from) = world.in_host(move || -> Result<(SocketAddr, SocketAddr)> {
        let mut s =
            TcpStream::connect_timeout(&SocketAddrV4::new(host_ip, GUEST_TCP_PORT).into(), TIMEOUT)
                .context("connect to the guest at HostIP")?;
        s.set_read_timeout(Some(TIMEOUT))?;
        s.write_all(b"hello guest")?;
        let mut buf = [0u8; 11];
        s.read_exact(&mut buf)?;
        ensure!(&buf == b"hello guest");
        ensure!(s.peer_addr()? == SocketAddrV4::new(host_ip, GUEST_TCP_PORT).into());
        let local = s.local_addr()?;
        let u = UdpSocket::bind("0.0.0.0:0")?;
        u.set_read_timeout(Some(TIMEOUT))?;
        u.send_to(b"ping", SocketAddrV4::new(host_ip, GUEST_UDP_PORT))?;
        let mut buf = [0u8; 16];
        let (n, from) = u.recv_from(&mut buf).context("udp reply from the guest")?;
        ensure!(&buf[..n] == b"ping");
        Ok((local, from))
    })??;
    // The reply to the unconnected UDP socket came from HostIP, not the guest.
    assert_eq!(udp_from, SocketAddrV4::new(host_ip, GUEST_UDP_PORT).into());
    // The guest saw the host's veth address as the peer.
    let peer = seen.recv_timeout(TIMEOUT)?;
    assert_eq!(peer.ip(), tcp_local.ip());
    assert_eq!(peer.ip().to_string(), slot.veth_ip.to_string());
    Ok(())
}

fn stats(agent: &Agent, index: i64) -> Result<[u64; netagent_common::COUNTER_COUNT]> {
    Ok(agent.manager().stats(index)?.counters)
}

/// Waits until the slot's counters stop moving (earlier connections finished
/// closing), so that the next exchange is counted alone.
fn settle(agent: &Agent, index: i64) -> Result<()> {
    let mut last = stats(agent, index)?;
    for _ in 0..50 {
        std::thread::sleep(Duration::from_millis(200));
        let now = stats(agent, index)?;
        if now == last {
            return Ok(());
        }
        last = now;
    }
    bail!("slot {index}'s counters never settled")
}

/// Everything the guest should be able to do, for one slot.
fn exercise(world: &World, agent: &Agent, slot: &SlotAddr, guest_ns: &str) -> Result<()> {
    let index = i64::from(slot.index);
    // Warm up ARP both ways so that the counted exchanges below are exact.
    udp_echo(world, guest_ns, 1, 8)?;

    // TCP: small and large (segmentation offload when it is on).
    let before = world.seen().tcp.len();
    tcp_echo(world, guest_ns, 64)?;
    tcp_echo(world, guest_ns, 256 * 1024)?;
    let seen = world.seen().tcp[before..].to_vec();
    ensure!(seen.len() == 2, "{seen:?}");
    for peer in seen {
        assert_eq!(
            peer.ip().to_string(),
            UPLINK_IP.to_string(),
            "wan saw {peer} not the uplink"
        );
    }

    // UDP: exact counters.
    settle(agent, index)?;
    let s0 = stats(agent, index)?;
    let n = 10;
    let payload = 100;
    let from = udp_echo(world, guest_ns, n, payload)?;
    for f in &from {
        assert_eq!(
            *f,
            SocketAddr::from(SocketAddrV4::new(WAN_IP, UDP_ECHO_PORT))
        );
    }
    let udp_peers: Vec<_> = world.seen().udp.iter().rev().take(n).copied().collect();
    for peer in udp_peers {
        assert_eq!(peer.ip().to_string(), UPLINK_IP.to_string());
        let port = peer.port();
        ensure!(
            (10000..=32767).contains(&port),
            "masquerade port {port} outside the range"
        );
    }
    let s1 = stats(agent, index)?;
    let frame = (14 + 20 + 8 + payload) as u64;
    let d = |c: usize| s1[c] - s0[c];
    assert_eq!(
        d(Counter::FROM_GUEST_PACKETS),
        n as u64,
        "from-guest packets"
    );
    assert_eq!(d(Counter::TO_GUEST_PACKETS), n as u64, "to-guest packets");
    assert_eq!(
        d(Counter::FROM_GUEST_BYTES),
        n as u64 * frame,
        "from-guest bytes"
    );
    assert_eq!(
        d(Counter::TO_GUEST_BYTES),
        n as u64 * frame,
        "to-guest bytes"
    );
    assert_eq!(
        d(Counter::NAT_ALLOCATIONS),
        1,
        "one UDP flow, one allocation"
    );
    assert_eq!(d(Counter::NAT_FAILURES), 0);

    // ICMP echo: exact counters too.
    let m = 5u16;
    ping(world, guest_ns, WAN_IP, 0x4242, m, 56)?;
    let s2 = stats(agent, index)?;
    let d = |c: usize| s2[c] - s1[c];
    assert_eq!(d(Counter::FROM_GUEST_PACKETS), u64::from(m));
    assert_eq!(d(Counter::TO_GUEST_PACKETS), u64::from(m));
    assert_eq!(
        d(Counter::FROM_GUEST_BYTES),
        u64::from(m) * (14 + 20 + 8 + 56)
    );
    assert_eq!(d(Counter::NAT_ALLOCATIONS), 1);
    for reason in netagent_common::DropReason::ALL {
        assert_eq!(s2[reason.counter()], 0, "drops for {}", reason.name());
    }

    host_reaches_guest(world, slot, guest_ns)?;
    Ok(())
}

/// Sends two raw UDP datagrams from the guest to the wan echo server, one with a
/// wrong checksum and one with a right one: the wan must see only the second.
/// This proves the wan verifies checksums (so the traffic above is a real check
/// of the datapath's checksum updates).
fn wan_drops_a_bad_checksum(world: &World, guest_ns: &str) -> Result<()> {
    let before = world.seen().udp.len();
    world.in_ns(guest_ns, || -> Result<()> {
        // SAFETY: plain socket(2); the result is checked before use.
        let fd = unsafe {
            libc::socket(
                libc::AF_INET,
                libc::SOCK_RAW | libc::SOCK_CLOEXEC,
                libc::IPPROTO_UDP,
            )
        };
        if fd < 0 {
            bail!("raw socket: {}", std::io::Error::last_os_error());
        }
        // SAFETY: `fd` was just created and is owned by nothing else.
        let sock = unsafe { UdpSocket::from_raw_fd(fd) };
        let src = Ipv4Addr::new(169, 254, 0, 21);
        for good in [false, true] {
            let payload = b"checksum probe";
            let len = (8 + payload.len()) as u16;
            let mut udp = Vec::new();
            udp.extend_from_slice(&40000u16.to_be_bytes());
            udp.extend_from_slice(&UDP_ECHO_PORT.to_be_bytes());
            udp.extend_from_slice(&len.to_be_bytes());
            udp.extend_from_slice(&[0, 0]);
            udp.extend_from_slice(payload);
            let mut pseudo = Vec::new();
            pseudo.extend_from_slice(&src.octets());
            pseudo.extend_from_slice(&WAN_IP.octets());
            pseudo.extend_from_slice(&[0, 17]);
            pseudo.extend_from_slice(&len.to_be_bytes());
            pseudo.extend_from_slice(&udp);
            let mut c = checksum(&pseudo);
            if !good {
                c ^= 0x5a5a;
            }
            udp[6..8].copy_from_slice(&c.to_be_bytes());
            sock.send_to(&udp, SocketAddrV4::new(WAN_IP, 0))?;
            std::thread::sleep(Duration::from_millis(300));
        }
        Ok(())
    })??;
    let seen = world.seen().udp.len() - before;
    assert_eq!(
        seen, 1,
        "the wan accepted {seen} of one bad and one good datagram"
    );
    Ok(())
}

/// Turns checksum offload off on the wan side too, so the wan verifies the
/// checksums of everything the datapath rewrote, and the guest verifies replies.
fn offload_off_everywhere(world: &World) -> Result<()> {
    world.in_ns(&world.wan_name(), || set_checksum_offload("eth0", false))??;
    world.in_host(|| set_checksum_offload("up0", false))??;
    Ok(())
}

fn tap_guest(offload: Offload) -> Result<()> {
    let Some(world) = World::new()? else {
        return Ok(());
    };
    if offload == Offload::Off {
        offload_off_everywhere(&world)?;
    }
    let agent = world.start_agent(|_| {})?;
    let (slot, _) = agent.run(|m| async move { m.create(1, GuestLink::Tap).await })??;
    let guest_ns = world.guest_namespace(1)?;
    let pump = Pump::start(&slot.namespace, &guest_ns, offload)?;
    exercise(&world, &agent, &slot, &guest_ns)?;
    ensure!(
        pump.counters()
            .to_tap
            .load(std::sync::atomic::Ordering::Relaxed)
            > 0
    );
    drop(pump);
    agent.shutdown()?;
    Ok(())
}

#[test]
fn tap_guest_with_checksum_offload() -> Result<()> {
    tap_guest(Offload::On)
}

#[test]
fn tap_guest_without_checksum_offload() -> Result<()> {
    tap_guest(Offload::Off)
}

fn veth_guest(offload: Offload) -> Result<()> {
    let Some(world) = World::new()? else {
        return Ok(());
    };
    if offload == Offload::Off {
        offload_off_everywhere(&world)?;
    }
    let agent = world.start_agent(|_| {})?;
    let guest_ns = world.guest_namespace(2)?;
    let g = GuestLink::Veth {
        guest_netns: guest_ns.clone(),
    };
    let (slot, _) = agent.run(|m| async move { m.create(2, g).await })??;
    if offload == Offload::Off {
        world.in_ns(&guest_ns, || set_checksum_offload("eth0", false))??;
    }
    exercise(&world, &agent, &slot, &guest_ns)?;
    replies_skip_the_guest_veths_transmit(&world, &slot, &guest_ns)?;
    if offload == Offload::Off {
        wan_drops_a_bad_checksum(&world, &guest_ns)?;
    }
    agent.shutdown()?;
    Ok(())
}

/// With a veth guest link, frames for the guest go from `eth0`'s ingress
/// straight to the guest's end (`bpf_redirect_peer`): the echoes arrive, and
/// the slot's end (`tap0`) transmits none of them.
fn replies_skip_the_guest_veths_transmit(
    world: &World,
    slot: &SlotAddr,
    guest_ns: &str,
) -> Result<()> {
    let tap_tx = || -> Result<u64> {
        let v = world.ip_json(
            Some(&slot.namespace),
            &["-s", "link", "show", "dev", &slot.tap],
        )?;
        v[0]["stats64"]["tx"]["packets"]
            .as_u64()
            .context("tap0 tx packets")
    };
    let before = tap_tx()?;
    let n = 10;
    ensure!(udp_echo(world, guest_ns, n, 64)?.len() == n);
    let after = tap_tx()?;
    ensure!(
        after == before,
        "{} transmitted {} frames for {n} echoes",
        slot.tap,
        after - before
    );
    Ok(())
}

#[test]
fn veth_guest_with_checksum_offload() -> Result<()> {
    veth_guest(Offload::On)
}

#[test]
fn veth_guest_without_checksum_offload() -> Result<()> {
    veth_guest(Offload::Off)
}

#[test]
fn two_slots_are_isolated_and_use_distinct_ports() -> Result<()> {
    let Some(world) = World::new()? else {
        return Ok(());
    };
    let agent = world.start_agent(|_| {})?;
    let mut slots = Vec::new();
    for i in [3u32, 4] {
        let guest_ns = world.guest_namespace(i)?;
        let g = GuestLink::Veth {
            guest_netns: guest_ns.clone(),
        };
        let (slot, _) = agent.run(move |m| async move { m.create(i.into(), g).await })??;
        slots.push((slot, guest_ns));
    }
    for (slot, guest_ns) in &slots {
        let s0 = stats(&agent, slot.index.into())?;
        udp_echo(&world, guest_ns, 3, 32)?;
        let s1 = stats(&agent, slot.index.into())?;
        assert_eq!(
            s1[Counter::FROM_GUEST_PACKETS] - s0[Counter::FROM_GUEST_PACKETS],
            3
        );
    }
    // Each slot's counters saw only its own traffic (4 = 1 ARP-warming + 3 counted
    // in the loop would be wrong: nothing else was sent).
    for (slot, _) in &slots {
        let s = stats(&agent, slot.index.into())?;
        assert_eq!(s[Counter::FROM_GUEST_PACKETS], 3, "slot {}", slot.index);
        assert_eq!(s[Counter::TO_GUEST_PACKETS], 3, "slot {}", slot.index);
    }
    let ports: std::collections::BTreeSet<u16> =
        world.seen().udp.iter().map(|p| p.port()).collect();
    assert_eq!(
        ports.len(),
        2,
        "the two slots' flows got one masquerade port each: {ports:?}"
    );
    agent.shutdown()?;
    Ok(())
}

/// Two guests with the same address and the same source port talk to the same
/// wan server at once: the wan sees two distinct masquerade ports, and each
/// guest gets back only its own replies (the flows are keyed by the slot's vpeer
/// address, not by the guest address every slot shares).
#[test]
fn two_guests_on_the_same_address_and_port_never_get_each_others_flows() -> Result<()> {
    let Some(world) = World::new()? else {
        return Ok(());
    };
    let agent = world.start_agent(|_| {})?;
    let mut guests = Vec::new();
    for i in [5u32, 6] {
        let guest_ns = world.guest_namespace(i)?;
        let g = GuestLink::Veth {
            guest_netns: guest_ns.clone(),
        };
        agent.run(move |m| async move { m.create(i.into(), g).await })??;
        guests.push(guest_ns);
    }
    const PORT: u16 = 40404;
    let sockets: Vec<UdpSocket> = guests
        .iter()
        .map(|ns| {
            world.in_ns(ns, || -> Result<UdpSocket> {
                let s = UdpSocket::bind(SocketAddrV4::new(Ipv4Addr::new(169, 254, 0, 21), PORT))?;
                s.set_read_timeout(Some(Duration::from_millis(500)))?;
                Ok(s)
            })?
        })
        .collect::<Result<_>>()?;
    let server = SocketAddrV4::new(WAN_IP, UDP_ECHO_PORT);
    for round in 0..5u8 {
        // Both send before either reads: the flows are live at the same time.
        for (g, s) in sockets.iter().enumerate() {
            s.send_to(&[b'A' + g as u8, round], server)?;
        }
        for (g, s) in sockets.iter().enumerate() {
            let mut got = Vec::new();
            let mut buf = [0u8; 64];
            while let Ok((n, from)) = s.recv_from(&mut buf) {
                ensure!(from == server.into(), "guest {g}: reply from {from}");
                got.push(buf[..n].to_vec());
            }
            ensure!(
                got == vec![vec![b'A' + g as u8, round]],
                "guest {g} round {round} got {got:?}: only its own reply, once"
            );
        }
    }
    let ports: std::collections::BTreeSet<u16> =
        world.seen().udp.iter().map(|p| p.port()).collect();
    ensure!(
        ports.len() == 2,
        "one masquerade port per guest flow: {ports:?}"
    );
    agent.shutdown()?;
    Ok(())
}
