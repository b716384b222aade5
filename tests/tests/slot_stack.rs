//! The slot namespace's own traffic, end to end in a throwaway world (DESIGN
//! §2.4: what is not a guest flow passes untouched). The slot namespace's
//! stack reaches the world through the masquerade on flows of its own, even
//! with the very ports a guest flow uses at the same moment; the host reaches
//! the slot namespace at the vpeer address; and the guest's own connection to
//! a host address (allowed by a rule of its slot) leaves as the vpeer and gets
//! its replies, while none of the slot namespace's packets reaches the guest.
//! Once with the guest behind a TAP (a frame pump standing in for the VMM),
//! once behind a veth guest link.

use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddrV4, TcpListener, TcpStream, UdpSocket};
use std::time::Duration;

use anyhow::{Context, Result, ensure};
use netagent::bpf::{Cidr, EgressRules};
use netagent::slot::GuestLink;
use netagent_common::Counter;
use netagent_tests::pump::{Offload, Pump};
use netagent_tests::world::{UDP_ECHO_PORT, UPLINK_IP, WAN_IP, World};

const TIMEOUT: Duration = Duration::from_secs(5);
const GUEST_IP: Ipv4Addr = Ipv4Addr::new(169, 254, 0, 21);

/// A UDP socket bound to `addr` inside namespace `ns`.
fn udp_in(world: &World, ns: &str, addr: SocketAddrV4) -> Result<UdpSocket> {
    world.in_ns(ns, move || -> Result<UdpSocket> {
        let s = UdpSocket::bind(addr).with_context(|| format!("bind {addr}"))?;
        s.set_read_timeout(Some(Duration::from_millis(500)))?;
        Ok(s)
    })?
}

/// Accepts one connection on `listener` and echoes what it reads until EOF.
fn echo_once(listener: TcpListener) -> std::thread::JoinHandle<Result<SocketAddrV4>> {
    std::thread::spawn(move || -> Result<SocketAddrV4> {
        let (mut c, peer) = listener.accept()?;
        c.set_read_timeout(Some(TIMEOUT))?;
        let mut buf = [0u8; 256];
        loop {
            let n = c.read(&mut buf)?;
            if n == 0 {
                break;
            }
            c.write_all(&buf[..n])?;
        }
        match peer {
            std::net::SocketAddr::V4(p) => Ok(p),
            other => anyhow::bail!("IPv6 peer {other}"),
        }
    })
}

/// Connects to `to`, sends `msg`, reads it back and closes; returns the local
/// address.
fn exchange(to: SocketAddrV4, msg: &[u8]) -> Result<SocketAddrV4> {
    let mut s = TcpStream::connect_timeout(&to.into(), TIMEOUT)
        .with_context(|| format!("connect to {to}"))?;
    s.set_read_timeout(Some(TIMEOUT))?;
    s.write_all(msg)?;
    let mut back = vec![0u8; msg.len()];
    s.read_exact(&mut back).context("read the echo")?;
    ensure!(back == msg, "echo differs");
    match s.local_addr()? {
        std::net::SocketAddr::V4(a) => Ok(a),
        other => anyhow::bail!("IPv6 local address {other}"),
    }
}

#[test]
fn the_slot_namespaces_own_traffic_stays_its_own_with_a_veth_guest() -> Result<()> {
    slot_stack(false)
}

#[test]
fn the_slot_namespaces_own_traffic_stays_its_own_with_a_tap_guest() -> Result<()> {
    slot_stack(true)
}

/// The scenario of the module doc, with the guest behind a TAP (a frame pump
/// standing in for the VMM) or a veth guest link.
fn slot_stack(tap: bool) -> Result<()> {
    let Some(world) = World::new()? else {
        return Ok(());
    };
    let agent = world.start_agent(|_| {})?;
    let guest_ns = world.guest_namespace(2)?;
    let g = if tap {
        GuestLink::Tap
    } else {
        GuestLink::Veth {
            guest_netns: guest_ns.clone(),
        }
    };
    let (slot, _) = agent.run(|m| async move { m.create(2, g).await })??;
    let _pump = if tap {
        Some(Pump::start(&slot.namespace, &guest_ns, Offload::On)?)
    } else {
        None
    };
    let (slot_ns, vpeer, veth_ip) = (slot.namespace.clone(), slot.vpeer_ip, slot.veth_ip);

    // The guest and the slot namespace's stack, both from port 40404 to the wan
    // echo server, at the same time: two flows, two masquerade ports, and each
    // side gets back only its own replies.
    const PORT: u16 = 40404;
    let sockets = [
        udp_in(&world, &guest_ns, SocketAddrV4::new(GUEST_IP, PORT))?,
        udp_in(&world, &slot_ns, SocketAddrV4::new(vpeer, PORT))?,
    ];
    let server = SocketAddrV4::new(WAN_IP, UDP_ECHO_PORT);
    for round in 0..3u8 {
        for (side, s) in sockets.iter().enumerate() {
            s.send_to(&[b'A' + side as u8, round], server)?;
        }
        for (side, s) in sockets.iter().enumerate() {
            let mut got = Vec::new();
            let mut buf = [0u8; 64];
            while let Ok((n, from)) = s.recv_from(&mut buf) {
                ensure!(from == server.into(), "side {side}: reply from {from}");
                got.push(buf[..n].to_vec());
            }
            ensure!(
                got == vec![vec![b'A' + side as u8, round]],
                "side {side} (0: guest, 1: slot namespace) round {round} got {got:?}"
            );
        }
    }
    let seen: std::collections::BTreeSet<_> = world.seen().udp.iter().copied().collect();
    ensure!(
        seen.len() == 2
            && seen
                .iter()
                .all(|p| p.ip().to_string() == UPLINK_IP.to_string()),
        "two masquerade flows from the uplink address: {seen:?}"
    );
    let stats = || -> Result<_> { Ok(agent.manager().stats(2)?.counters) };
    let s = stats()?;
    ensure!(
        (s[Counter::FROM_GUEST_PACKETS], s[Counter::TO_GUEST_PACKETS]) == (3, 3),
        "the guest's datagrams only: {:?}",
        (s[Counter::FROM_GUEST_PACKETS], s[Counter::TO_GUEST_PACKETS])
    );

    // The host connects to the vpeer address: the slot namespace answers.
    let listener = world.in_ns(&slot_ns, move || {
        TcpListener::bind(SocketAddrV4::new(vpeer, 7070))
    })??;
    let server = echo_once(listener);
    let local =
        world.in_host(move || exchange(SocketAddrV4::new(vpeer, 7070), b"to the slot"))??;
    let peer = server.join().expect("slot namespace server")?;
    ensure!(
        peer == local,
        "the slot namespace saw {peer}, the host is {local}"
    );
    ensure!(stats()? == s, "none of it went through the guest's side");

    // The guest connects to a host address its slot allows: it leaves as the
    // vpeer address and the host's replies come back to the guest.
    let allow = EgressRules {
        allow: vec![Cidr::new(veth_ip, 32)?],
        deny: vec![],
    };
    agent.run(move |m| async move { m.set_egress(2, allow).await })??;
    let listener = world.in_host(move || TcpListener::bind(SocketAddrV4::new(veth_ip, 7071)))??;
    let server = echo_once(listener);
    let local = world.in_ns(&guest_ns, move || {
        exchange(SocketAddrV4::new(veth_ip, 7071), b"to the host")
    })??;
    let peer = server.join().expect("host server")?;
    ensure!(
        peer == SocketAddrV4::new(vpeer, local.port()),
        "the host saw {peer} for the guest's {local}"
    );
    let s2 = stats()?;
    ensure!(
        s2[Counter::TO_GUEST_PACKETS] > s[Counter::TO_GUEST_PACKETS],
        "the host's replies reached the guest"
    );
    agent.shutdown()?;
    Ok(())
}
