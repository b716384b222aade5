//! Restart without traffic loss, against a real `netagent up` (see
//! `netagent_tests::daemon`): connections through the masquerade and to HostIP
//! survive `kill -9` and a restart byte-exact, a UDP stream across the window
//! loses nothing, the restarted agent replaced the program on every hook and
//! kept the flows; broken slots and pins of another layout are removed and
//! reported, never adopted; an agent killed right after any step of create or
//! delete leaves nothing behind once restarted.

use std::collections::{BTreeMap, BTreeSet};
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context, Result, bail, ensure};
use aya::maps::{Array, HashMap, Map, MapData, MapInfo};
use aya::programs::{SchedClassifier, TcAttachType};
use netagent::bpf::EgressRules;
use netagent::slot::{CreateStep, DeleteStep, GuestLink, GuestMac, PolicyRequest, RateLimitSpec};
use netagent_common::{
    CONFIG_F_TO_GUEST_MARK, FlowKey, GlobalConfig, MAP_CONFIG, MAP_NAT_EGRESS, MAP_SLOTS, NatEntry,
    SlotInfo,
};
use netagent_tests::daemon::{Daemon, Netns, UPLINK, WAN_IP, in_netns, spawn_in_netns};
use netagent_tests::leaks::{Strictness, Target, settled_leaks, snapshot};
use serde_json::Value;

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

/// Byte `i` of a test stream.
fn pattern(i: u64) -> u8 {
    (i.wrapping_mul(31) % 251) as u8
}

/// A TCP connection to an echo server and how many bytes it carried.
struct Conversation {
    stream: TcpStream,
    offset: u64,
}

impl Conversation {
    /// Sends `n` pattern bytes and reads them back, checking every byte.
    fn exchange(&mut self, n: usize) -> Result<()> {
        let data: Vec<u8> = (0..n as u64).map(|i| pattern(self.offset + i)).collect();
        self.stream.write_all(&data)?;
        let mut back = vec![0u8; n];
        self.stream
            .read_exact(&mut back)
            .context("reading the echo")?;
        ensure!(back == data, "echo differs at offset {}", self.offset);
        self.offset += n as u64;
        Ok(())
    }
}

/// A one-connection TCP echo server at `addr` in namespace `ns`.
fn tcp_echo_server(ns: &str, addr: SocketAddr) -> Result<std::thread::JoinHandle<Result<()>>> {
    let (tx, rx) = std::sync::mpsc::channel();
    let server = spawn_in_netns(ns, move || {
        let listener = TcpListener::bind(addr)?;
        let _ = tx.send(());
        let (mut conn, _) = listener.accept()?;
        let mut buf = [0u8; 65536];
        loop {
            let n = conn.read(&mut buf)?;
            if n == 0 {
                return Ok(());
            }
            conn.write_all(&buf[..n])?;
        }
    });
    rx.recv_timeout(Duration::from_secs(5))
        .context("echo server did not start")?;
    Ok(server)
}

/// Connects from namespace `ns` to `to`.
fn connect_from(ns: &str, to: SocketAddr) -> Result<Conversation> {
    let stream = spawn_in_netns(ns, move || {
        Ok(TcpStream::connect_timeout(&to, Duration::from_secs(5))?)
    })
    .join()
    .map_err(|_| anyhow::anyhow!("connect thread panicked"))??;
    stream.set_read_timeout(Some(Duration::from_secs(5)))?;
    Ok(Conversation { stream, offset: 0 })
}

/// A UDP sequence stream from a guest through the masquerade to a wan echo
/// server: every datagram carries its sequence number; the server records what
/// arrived, the client what came back.
struct UdpStream {
    stop: Arc<AtomicBool>,
    sent: Arc<AtomicU64>,
    at_server: Arc<Mutex<BTreeSet<u64>>>,
    echoed: Arc<Mutex<BTreeSet<u64>>>,
    threads: Vec<std::thread::JoinHandle<Result<()>>>,
}

impl UdpStream {
    fn start(guest_ns: &str, wan_ns: &str, port: u16) -> Result<UdpStream> {
        let stop = Arc::new(AtomicBool::new(false));
        let sent = Arc::new(AtomicU64::new(0));
        let at_server = Arc::new(Mutex::new(BTreeSet::new()));
        let echoed = Arc::new(Mutex::new(BTreeSet::new()));
        let server_addr: SocketAddr = format!("{WAN_IP}:{port}").parse()?;
        let (tx, rx) = std::sync::mpsc::channel();
        let (stop_s, seen) = (stop.clone(), at_server.clone());
        let server = spawn_in_netns(wan_ns, move || {
            let sock = UdpSocket::bind(server_addr)?;
            sock.set_read_timeout(Some(Duration::from_millis(100)))?;
            let _ = tx.send(());
            let mut buf = [0u8; 2048];
            // Runs until stopped and quiet.
            loop {
                match sock.recv_from(&mut buf) {
                    Ok((n, from)) if n >= 8 => {
                        let seq = u64::from_be_bytes(buf[..8].try_into().unwrap());
                        seen.lock().unwrap().insert(seq);
                        sock.send_to(&buf[..n], from)?;
                    }
                    Ok(_) => {}
                    Err(_) if stop_s.load(Ordering::Relaxed) => return Ok(()),
                    Err(_) => {}
                }
            }
        });
        rx.recv_timeout(Duration::from_secs(5))
            .context("udp server did not start")?;
        let sock = spawn_in_netns(guest_ns, move || {
            let s = UdpSocket::bind("0.0.0.0:0")?;
            s.connect(server_addr)?;
            Ok(s)
        })
        .join()
        .map_err(|_| anyhow::anyhow!("udp bind panicked"))??;
        sock.set_read_timeout(Some(Duration::from_millis(100)))?;
        let reader = sock.try_clone()?;
        let (stop_r, back) = (stop.clone(), echoed.clone());
        let receiver = std::thread::spawn(move || {
            let mut buf = [0u8; 2048];
            loop {
                match reader.recv(&mut buf) {
                    Ok(n) if n >= 8 => {
                        back.lock()
                            .unwrap()
                            .insert(u64::from_be_bytes(buf[..8].try_into().unwrap()));
                    }
                    Ok(_) => {}
                    Err(_) if stop_r.load(Ordering::Relaxed) => return Ok(()),
                    Err(_) => {}
                }
            }
        });
        let (stop_w, count) = (stop.clone(), sent.clone());
        let sender = std::thread::spawn(move || {
            let mut payload = [0x5au8; 64];
            let mut seq = 0u64;
            while !stop_w.load(Ordering::Relaxed) {
                payload[..8].copy_from_slice(&seq.to_be_bytes());
                sock.send(&payload)?;
                seq += 1;
                count.store(seq, Ordering::Relaxed);
                std::thread::sleep(Duration::from_micros(500));
            }
            Ok(())
        });
        Ok(UdpStream {
            stop,
            sent,
            at_server,
            echoed,
            threads: vec![server, receiver, sender],
        })
    }

    /// Stops sending, lets the last echoes arrive; returns (sent, at the
    /// server, echoed back).
    fn finish(mut self) -> Result<(u64, usize, usize)> {
        // The sender first, then time for the last datagrams, then the rest.
        let sender = self.threads.pop().unwrap();
        self.stop.store(true, Ordering::Relaxed);
        sender
            .join()
            .map_err(|_| anyhow::anyhow!("sender panicked"))??;
        std::thread::sleep(Duration::from_millis(300));
        for t in self.threads.drain(..) {
            t.join()
                .map_err(|_| anyhow::anyhow!("udp thread panicked"))??;
        }
        let sent = self.sent.load(Ordering::Relaxed);
        let server = self.at_server.lock().unwrap();
        let back = self.echoed.lock().unwrap();
        Ok((sent, server.len(), back.len()))
    }
}

/// Program id of netagent's tc filter on ingress of `dev` in `ns`.
fn filter_prog_id(ns: &str, dev: &str) -> Result<u32> {
    let out = in_netns(ns, "tc", &["-j", "filter", "show", "dev", dev, "ingress"])?;
    ensure!(
        out.status.success(),
        "tc filter show dev {dev}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: Value = serde_json::from_slice(&out.stdout)
        .with_context(|| format!("tc json: {}", String::from_utf8_lossy(&out.stdout)))?;
    v.as_array()
        .into_iter()
        .flatten()
        .find_map(|f| f["options"]["prog"]["id"].as_u64())
        .map(|id| id as u32)
        .with_context(|| format!("no bpf filter on {dev} in {ns}: {v}"))
}

/// Program id on the uplink's ingress (TCX link, else a filter).
fn uplink_prog_id(host_ns: &str) -> Result<u32> {
    let ids = spawn_in_netns(host_ns, || {
        let (_, progs) = SchedClassifier::query_tcx(UPLINK, TcAttachType::Ingress)?;
        Ok(progs.iter().map(|p| p.id()).collect::<Vec<u32>>())
    })
    .join()
    .map_err(|_| anyhow::anyhow!("query thread panicked"))??;
    match ids.as_slice() {
        [id] => Ok(*id),
        [] => filter_prog_id(host_ns, UPLINK),
        more => bail!("several TCX programs on the uplink: {more:?}"),
    }
}

/// Program ids of slot `n`'s three hooks and the uplink's.
fn hook_prog_ids(d: &Daemon, n: u32) -> Result<BTreeMap<String, u32>> {
    let p = &d.world.prefix;
    let ns = format!("{p}-ns-{n}");
    let mut ids = BTreeMap::new();
    ids.insert("uplink".into(), uplink_prog_id(&d.world.host_ns)?);
    ids.insert(
        format!("{p}-veth-{n}"),
        filter_prog_id(&d.world.host_ns, &format!("{p}-veth-{n}"))?,
    );
    ids.insert(format!("tap0 of slot {n}"), filter_prog_id(&ns, "tap0")?);
    ids.insert(format!("eth0 of slot {n}"), filter_prog_id(&ns, "eth0")?);
    Ok(ids)
}

fn open_pin(d: &Daemon, name: &str) -> Result<MapData> {
    let path = d.world.bpffs().join(name);
    MapData::from_pin(&path).with_context(|| format!("open {}", path.display()))
}

type FlowTuple = (u32, u32, u16, u16, u8);

/// NAT_EGRESS as pinned: flow → (translated port, slot).
fn nat_entries(d: &Daemon) -> Result<BTreeMap<FlowTuple, (u16, u32)>> {
    let map =
        HashMap::<_, FlowKey, NatEntry>::try_from(Map::HashMap(open_pin(d, MAP_NAT_EGRESS)?))?;
    let mut out = BTreeMap::new();
    for item in map.iter() {
        let (k, v) = item?;
        out.insert(
            (k.saddr, k.daddr, k.sport, k.dport, k.proto),
            (v.port, v.slot),
        );
    }
    Ok(out)
}

fn map_id(d: &Daemon, name: &str) -> Result<u32> {
    Ok(MapInfo::from_pin(d.world.bpffs().join(name))?.id())
}

fn verify_clean(d: &Daemon, rt: &tokio::runtime::Runtime) -> Result<()> {
    let report = rt.block_on(d.client().verify())?;
    ensure!(report.clean, "verify after restart:\n{}", report.render());
    Ok(())
}

/// The "start-up:" summary line of the agent's log.
fn startup_line(d: &Daemon) -> String {
    d.logs()
        .lines()
        .find(|l| l.contains("start-up:"))
        .unwrap_or("<no start-up line>")
        .to_string()
}

#[test]
fn connections_survive_kill_and_restart_and_programs_are_replaced() -> Result<()> {
    let test = "connections_survive_kill_and_restart_and_programs_are_replaced";
    let Some(mut d) = Daemon::start(test)? else {
        return Ok(());
    };
    let rt = rt();
    let p = d.world.prefix.clone();
    let guest = Netns::add(&format!("{p}-g1"))?;
    let veth = GuestLink::Veth {
        guest_netns: guest.name.clone(),
    };
    rt.block_on(d.client().create_slot(1, &veth))?;
    let before_slots = rt.block_on(d.client().slots())?;

    // guest → wan through the masquerade, host → HostIP, and a UDP stream.
    let wan_addr: SocketAddr = format!("{WAN_IP}:7100").parse()?;
    let wan_server = tcp_echo_server(&d.world.wan_ns, wan_addr)?;
    let mut out = connect_from(&guest.name, wan_addr)?;
    let guest_addr: SocketAddr = "0.0.0.0:7200".parse()?;
    let guest_server = tcp_echo_server(&guest.name, guest_addr)?;
    let mut inbound = connect_from(&d.world.host_ns, "10.11.0.1:7200".parse()?)?;
    let udp = UdpStream::start(&guest.name, &d.world.wan_ns, 7101)?;
    const CHUNK: usize = 64 * 1024;
    out.exchange(CHUNK)?;
    inbound.exchange(CHUNK)?;
    std::thread::sleep(Duration::from_millis(200));

    let ids_before = hook_prog_ids(&d, 1)?;
    let nat_before = nat_entries(&d)?;
    ensure!(
        nat_before.values().filter(|(_, slot)| *slot == 1).count() >= 2,
        "expected the TCP and UDP flows in NAT_EGRESS: {nat_before:?}"
    );
    let nat_map = map_id(&d, MAP_NAT_EGRESS)?;

    // Killed: nothing runs, the kernel path keeps carrying both connections.
    d.stop_with(nix::sys::signal::Signal::SIGKILL)?;
    out.exchange(CHUNK)?;
    inbound.exchange(CHUNK)?;
    std::thread::sleep(Duration::from_millis(300));

    // The new agent adopts the slot and replaces every program in place.
    d.launch(&[])?;
    out.exchange(CHUNK)?;
    inbound.exchange(CHUNK)?;
    std::thread::sleep(Duration::from_millis(300));
    let (sent, at_server, echoed) = udp.finish()?;
    println!(
        "carried across kill -9 + restart: TCP via masquerade {} bytes, host->HostIP {} bytes, \
         UDP {sent} datagrams sent, {at_server} at the server, {echoed} echoed back",
        out.offset, inbound.offset
    );
    ensure!(
        sent > 500 && at_server as u64 == sent && echoed as u64 == sent,
        "UDP loss across the restart: sent {sent}, at the server {at_server}, echoed {echoed}"
    );
    ensure!(out.offset == 3 * CHUNK as u64 && inbound.offset == 3 * CHUNK as u64);

    let line = startup_line(&d);
    ensure!(
        line.contains("maps reused") && line.contains("adopted 1 slot(s) [1]"),
        "{line}"
    );
    ensure!(line.contains("uplink hook taken over"), "{line}");
    // The maps were reused, so the reply translation on the uplink was off
    // until the slot was adopted; now it is on again.
    let config = Array::<_, GlobalConfig>::try_from(Map::Array(open_pin(&d, MAP_CONFIG)?))?;
    ensure!(
        config.get(&0, 0)?.flags & CONFIG_F_TO_GUEST_MARK != 0,
        "after the adoption, replies are not translated for the guest on the uplink"
    );
    let ids_after = hook_prog_ids(&d, 1)?;
    for (hook, before) in &ids_before {
        let after = ids_after[hook];
        ensure!(
            after != *before,
            "the program on {hook} was not replaced (id {before} before and after)"
        );
    }
    println!("program ids before {ids_before:?}, after {ids_after:?}");
    ensure!(
        map_id(&d, MAP_NAT_EGRESS)? == nat_map,
        "NAT_EGRESS is another map"
    );
    let nat_after = nat_entries(&d)?;
    for (flow, entry) in &nat_before {
        ensure!(
            nat_after.get(flow) == Some(entry),
            "NAT entry {flow:?} {entry:?} lost or changed: {nat_after:?}"
        );
    }
    let after_slots = rt.block_on(d.client().slots())?;
    ensure!(
        after_slots == before_slots,
        "{after_slots:?} != {before_slots:?}"
    );
    verify_clean(&d, &rt)?;

    // The adopted slot is the agent's: delete works and leaves nothing.
    drop(out);
    drop(inbound);
    let _ = wan_server.join();
    let _ = guest_server.join();
    rt.block_on(d.client().delete_slot(1))?;
    ensure!(d.world.slot_namespaces().is_empty());
    verify_clean(&d, &rt)?;
    Ok(())
}

#[test]
fn broken_slots_are_removed_and_intact_ones_adopted() -> Result<()> {
    let Some(mut d) = Daemon::start("broken_slots_are_removed_and_intact_ones_adopted")? else {
        return Ok(());
    };
    let rt = rt();
    let p = d.world.prefix.clone();
    // Slot 4 carries every security setting: they are read back from the maps.
    let policy = PolicyRequest {
        guest_mac: Some(GuestMac([0x02, 0, 0, 0, 0, 0x44])),
        egress: Some(EgressRules {
            allow: vec!["198.18.0.0/24".parse()?],
            deny: vec!["198.19.0.0/16".parse()?],
        }),
        rate_limit: Some(RateLimitSpec {
            bits_per_second: 80_000_000,
            burst_bytes: 65_536,
        }),
    };
    let slot4 = rt.block_on(async {
        for n in [1, 2, 3] {
            d.client().create_slot(n, &GuestLink::Tap).await?;
        }
        let (slot4, _) = d
            .client()
            .create_slot_with(4, &GuestLink::Tap, &policy)
            .await?;
        anyhow::Ok(slot4)
    })?;
    d.stop_with(nix::sys::signal::Signal::SIGKILL)?;

    // While no agent runs: slot 2 loses its tap0, slot 3 its SLOTS entry.
    netagent_tests::daemon::ip(&["-n", &format!("{p}-ns-2"), "link", "del", "tap0"])?;
    let mut slots = Array::<_, SlotInfo>::try_from(Map::Array(open_pin(&d, MAP_SLOTS)?))?;
    slots.set(3, SlotInfo::default(), 0)?;
    drop(slots);

    d.launch(&[])?;
    let listed: Vec<u32> = rt
        .block_on(d.client().slots())?
        .iter()
        .map(|s| s.addr.index)
        .collect();
    ensure!(listed == vec![1, 4], "adopted {listed:?}");
    let adopted4 = rt.block_on(d.client().slot(4))?;
    ensure!(adopted4 == slot4, "{adopted4:?} != {slot4:?}");
    // The same request again is "exists identically".
    let (_, created) = rt.block_on(d.client().create_slot_with(4, &GuestLink::Tap, &policy))?;
    ensure!(!created);
    let line = startup_line(&d);
    ensure!(
        line.contains("adopted 2 slot(s) [1, 4]")
            && line.contains("removed 2 slot(s)")
            && line.contains("slot 2 (tap0 is missing)")
            && line.contains("slot 3 (")
            && line.contains("SLOTS[3] is not active"),
        "{line}"
    );
    ensure!(
        d.world.slot_namespaces() == vec![format!("{p}-ns-1"), format!("{p}-ns-4")],
        "{:?}",
        d.world.slot_namespaces()
    );
    verify_clean(&d, &rt)?;
    // The removed slots can be made again, the adopted ones deleted.
    rt.block_on(async {
        for n in [2, 3] {
            let (_, created) = d.client().create_slot(n, &GuestLink::Tap).await?;
            ensure!(created, "slot {n} was not created anew");
        }
        d.client().delete_slot(1).await?;
        anyhow::Ok(())
    })?;
    verify_clean(&d, &rt)?;

    // A slot without its record: verify names it, and a restart does not
    // adopt it (the record is what says its create finished).
    let record = netagent::slot::adopt::records_dir(&p).join("4");
    std::fs::remove_file(&record).with_context(|| format!("{}", record.display()))?;
    let report = rt.block_on(d.client().verify())?;
    ensure!(
        !report.clean && report.render().contains("slot 4: missing slot record"),
        "{}",
        report.render()
    );
    d.stop_with(nix::sys::signal::Signal::SIGKILL)?;
    d.launch(&[])?;
    let line = startup_line(&d);
    ensure!(
        line.contains("adopted 2 slot(s) [2, 3]")
            && line.contains("slot 4 (no record of a finished create"),
        "{line}"
    );
    verify_clean(&d, &rt)?;
    Ok(())
}

#[test]
fn a_layout_mismatch_is_reported_and_the_pins_are_not_reused() -> Result<()> {
    let Some(mut d) = Daemon::start("a_layout_mismatch_is_reported_and_the_pins_are_not_reused")?
    else {
        return Ok(());
    };
    let rt = rt();
    rt.block_on(d.client().create_slot(1, &GuestLink::Tap))?;
    d.stop_with(nix::sys::signal::Signal::SIGKILL)?;
    let old_map = map_id(&d, MAP_NAT_EGRESS)?;

    // Another agent version pinned these: its NAT_EGRESS line differs.
    let pin = d.world.bpffs().join(netagent::bpf::layout::LAYOUT_PIN);
    let ours = netagent::bpf::layout::read_stored_at(&pin)
        .map_err(anyhow::Error::msg)?
        .context("no stored layout descriptor")?;
    let tampered = ours.replace(
        "map NAT_EGRESS type=Hash key=16",
        "map NAT_EGRESS type=Hash key=20",
    );
    ensure!(tampered != ours, "{ours}");
    netagent::bpf::layout::overwrite_stored(&pin, &tampered).map_err(anyhow::Error::msg)?;

    d.launch(&[])?;
    let logs = d.logs();
    let line = startup_line(&d);
    ensure!(
        line.contains("maps new (layout mismatch: descriptor map NAT_EGRESS: stored ")
            && line.contains("map NAT_EGRESS type=Hash key=20 value=24"),
        "{line}"
    );
    ensure!(
        logs.contains("have another layout: NOT reusing them"),
        "{logs}"
    );
    ensure!(
        map_id(&d, MAP_NAT_EGRESS)? != old_map,
        "the old NAT_EGRESS was reused"
    );
    ensure!(
        line.contains("removed 1 slot(s)") && line.contains("slot 1 ("),
        "{line}"
    );
    ensure!(rt.block_on(d.client().slots())?.is_empty());
    ensure!(d.world.slot_namespaces().is_empty());
    verify_clean(&d, &rt)?;
    // And the next restart finds its own layout again: reused.
    rt.block_on(d.client().create_slot(1, &GuestLink::Tap))?;
    d.stop_with(nix::sys::signal::Signal::SIGKILL)?;
    d.launch(&[])?;
    let line = startup_line(&d);
    ensure!(
        line.contains("maps reused") && line.contains("adopted 1 slot(s) [1]"),
        "{line}"
    );
    verify_clean(&d, &rt)?;
    Ok(())
}

/// One crash-injection cycle: an agent that aborts right after `point`
/// (`create:<step>` or `delete:<step>`), a restart, then no leftovers against
/// the snapshot taken before the interrupted operation, a clean verify, and
/// the slot made and deleted again.
fn crash_cycle(
    d: &mut Daemon,
    rt: &tokio::runtime::Runtime,
    point: &str,
    guest: &GuestLink,
) -> Result<()> {
    let watch = match guest {
        GuestLink::Veth { guest_netns } => Some(guest_netns.clone()),
        GuestLink::Tap => None,
    };
    let target = |d: &Daemon| {
        let t = Target::of(d);
        match &watch {
            Some(ns) => t.watch(ns),
            None => t,
        }
    };
    d.launch_env(&[], &[("NETAGENT_CRASH_AT", point)])?;
    let deleting = point.starts_with("delete:");
    let base = if deleting {
        let base = snapshot(&target(d));
        rt.block_on(d.client().create_slot(1, guest))?;
        base
    } else {
        snapshot(&target(d))
    };
    let c = d.client().with_timeout(Duration::from_secs(20));
    let result = if deleting {
        rt.block_on(c.delete_slot(1)).map(drop)
    } else {
        rt.block_on(c.create_slot(1, guest)).map(drop)
    };
    let status = d.wait_exit(Duration::from_secs(20))?;
    ensure!(
        status.is_some(),
        "{point}: the agent did not crash ({result:?}):\n{}",
        d.logs()
    );
    ensure!(
        result.is_err(),
        "{point}: the request succeeded before the crash"
    );

    d.launch(&[])?;
    let slots = rt.block_on(d.client().slots())?;
    ensure!(
        slots.is_empty(),
        "{point}: adopted {slots:?}\n{}",
        startup_line(d)
    );
    verify_clean(d, rt).with_context(|| point.to_string())?;
    let (_, leaks) = settled_leaks(
        &target(d),
        &base,
        Strictness::Instance,
        Duration::from_secs(20),
    );
    // A different agent process: its own fds and threads are not the crashed one's.
    let leaks: Vec<_> = leaks
        .into_iter()
        .filter(|l| !l.kind.starts_with("agent"))
        .collect();
    ensure!(
        leaks.is_empty(),
        "{point}: leftovers after the restart: {leaks:?}"
    );
    let (_, created) = rt.block_on(d.client().create_slot(1, guest))?;
    ensure!(created, "{point}: slot 1 was not created anew");
    rt.block_on(d.client().delete_slot(1))?;
    d.stop()?;
    Ok(())
}

#[test]
fn a_crash_after_any_step_of_create_or_delete_leaves_nothing_after_a_restart() -> Result<()> {
    let test = "a_crash_after_any_step_of_create_or_delete_leaves_nothing_after_a_restart";
    let Some(mut d) = Daemon::start(test)? else {
        return Ok(());
    };
    d.stop()?;
    d.use_crash_points()?;
    let rt = rt();
    let guest = Netns::add(&format!("{}-g1", d.world.prefix))?;
    let veth = GuestLink::Veth {
        guest_netns: guest.name.clone(),
    };
    let mut points = 0;
    for step in CreateStep::ALL {
        // GuestConfig runs for veth guest links only.
        let g = if step == CreateStep::GuestConfig {
            &veth
        } else {
            &GuestLink::Tap
        };
        crash_cycle(&mut d, &rt, &format!("create:{}", step.name()), g)?;
        points += 1;
    }
    // Delete with a veth guest link: its GuestLink step does work.
    for step in DeleteStep::ALL {
        crash_cycle(&mut d, &rt, &format!("delete:{}", step.name()), &veth)?;
        points += 1;
    }
    println!("{points} crash points, each followed by a restart: no leftovers");
    d.launch(&[])?;
    Ok(())
}

#[test]
fn sigusr1_exits_keeping_the_slots_for_an_upgrade_that_loses_nothing() -> Result<()> {
    let test = "sigusr1_exits_keeping_the_slots_for_an_upgrade_that_loses_nothing";
    let Some(mut d) = Daemon::start(test)? else {
        return Ok(());
    };
    let rt = rt();
    let p = d.world.prefix.clone();
    let guest = Netns::add(&format!("{p}-g1"))?;
    let veth = GuestLink::Veth {
        guest_netns: guest.name.clone(),
    };
    rt.block_on(async {
        d.client().create_slot(1, &veth).await?;
        d.client().create_slot(2, &GuestLink::Tap).await?;
        anyhow::Ok(())
    })?;
    let before = rt.block_on(d.client().slots())?;
    let udp = UdpStream::start(&guest.name, &d.world.wan_ns, 7102)?;
    std::thread::sleep(Duration::from_millis(200));
    let ids_before = hook_prog_ids(&d, 1)?;

    // The old agent leaves, keeping everything; the new one takes over.
    let status = d.stop_with(nix::sys::signal::Signal::SIGUSR1)?;
    ensure!(status.success(), "exit {status}:\n{}", d.logs());
    ensure!(d.logs().contains("exiting without deleting the slots"));
    ensure!(d.world.slot_namespaces().len() == 2);
    ensure!(!d.world.socket().exists(), "the socket was left behind");
    std::thread::sleep(Duration::from_millis(200));
    d.launch(&[])?;
    std::thread::sleep(Duration::from_millis(300));
    let (sent, at_server, echoed) = udp.finish()?;
    println!(
        "upgrade (SIGUSR1 + restart): UDP {sent} sent, {at_server} at the server, {echoed} echoed back"
    );
    ensure!(
        sent > 500 && at_server as u64 == sent && echoed as u64 == sent,
        "UDP loss across the upgrade: sent {sent}, at the server {at_server}, echoed {echoed}"
    );
    let line = startup_line(&d);
    ensure!(line.contains("adopted 2 slot(s) [1, 2]"), "{line}");
    let ids_after = hook_prog_ids(&d, 1)?;
    for (hook, before) in &ids_before {
        ensure!(
            ids_after[hook] != *before,
            "the program on {hook} was not replaced"
        );
    }
    ensure!(rt.block_on(d.client().slots())? == before);
    verify_clean(&d, &rt)?;

    // SIGTERM still removes everything.
    let status = d.stop()?;
    ensure!(status.success(), "exit {status}:\n{}", d.logs());
    ensure!(
        d.world.slot_namespaces().is_empty(),
        "{:?}",
        d.world.slot_namespaces()
    );
    ensure!(
        !d.world
            .bpffs()
            .join(netagent::bpf::UPLINK_LINK_PIN)
            .exists(),
        "the uplink link pin was left behind"
    );
    Ok(())
}

#[test]
fn cleanup_after_a_kill_removes_every_hook_pin_and_record() -> Result<()> {
    let test = "cleanup_after_a_kill_removes_every_hook_pin_and_record";
    let Some(mut d) = Daemon::start(test)? else {
        return Ok(());
    };
    let rt = rt();
    rt.block_on(d.client().create_slot(1, &GuestLink::Tap))?;
    d.stop_with(nix::sys::signal::Signal::SIGKILL)?;
    // Everything outlived the agent: the uplink's hook, the pins, the record.
    uplink_prog_id(&d.world.host_ns)?;
    let records = netagent::slot::adopt::records_dir(&d.world.prefix);
    ensure!(records.join("1").exists());
    ensure!(
        d.world
            .bpffs()
            .join(netagent::bpf::UPLINK_LINK_PIN)
            .exists()
    );

    let (p, bpffs) = (
        d.world.prefix.clone(),
        d.world.bpffs().display().to_string(),
    );
    let out = d.cli(&["cleanup", "--prefix", &p, "--bpffs", &bpffs])?;
    ensure!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    ensure!(d.world.slot_namespaces().is_empty());
    ensure!(!records.exists(), "the slot records are left");
    let pins: Vec<_> = std::fs::read_dir(d.world.bpffs())?
        .flatten()
        .map(|e| e.file_name())
        .collect();
    ensure!(pins.is_empty(), "pins left: {pins:?}");
    let left = spawn_in_netns(&d.world.host_ns, || {
        let (_, progs) = SchedClassifier::query_tcx(UPLINK, TcAttachType::Ingress)?;
        Ok(progs.len())
    })
    .join()
    .map_err(|_| anyhow::anyhow!("query thread panicked"))??;
    ensure!(left == 0, "{left} program(s) still on the uplink");
    ensure!(
        filter_prog_id(&d.world.host_ns, UPLINK).is_err(),
        "a filter is still on the uplink"
    );
    Ok(())
}

#[test]
fn the_clsact_uplink_filter_is_taken_over_and_cleaned_up_too() -> Result<()> {
    let test = "the_clsact_uplink_filter_is_taken_over_and_cleaned_up_too";
    let Some(mut d) = Daemon::start(test)? else {
        return Ok(());
    };
    d.stop()?;
    // The fallback of kernels without TCX, forced (fault-injection builds).
    d.use_crash_points()?;
    let clsact = [("NETAGENT_ATTACH_MODE", "clsact")];
    d.launch_env(&[], &clsact)?;
    let rt = rt();
    let host = d.world.host_ns.clone();
    let tcx = spawn_in_netns(&host, || {
        Ok(SchedClassifier::query_tcx(UPLINK, TcAttachType::Ingress)?
            .1
            .len())
    })
    .join()
    .map_err(|_| anyhow::anyhow!("query thread panicked"))??;
    ensure!(tcx == 0, "a TCX program on the uplink in clsact mode");
    ensure!(
        !d.world
            .bpffs()
            .join(netagent::bpf::UPLINK_LINK_PIN)
            .exists()
    );
    let before = filter_prog_id(&host, UPLINK)?;

    let guest = Netns::add(&format!("{}-g1", d.world.prefix))?;
    let veth = GuestLink::Veth {
        guest_netns: guest.name.clone(),
    };
    rt.block_on(d.client().create_slot(1, &veth))?;
    let udp = UdpStream::start(&guest.name, &d.world.wan_ns, 7103)?;
    std::thread::sleep(Duration::from_millis(200));
    d.stop_with(nix::sys::signal::Signal::SIGKILL)?;
    std::thread::sleep(Duration::from_millis(200));
    d.launch_env(&[], &clsact)?;
    std::thread::sleep(Duration::from_millis(300));
    let (sent, at_server, echoed) = udp.finish()?;
    println!("clsact uplink: UDP {sent} sent, {at_server} at the server, {echoed} echoed back");
    ensure!(
        sent > 300 && at_server as u64 == sent && echoed as u64 == sent,
        "UDP loss across the restart: sent {sent}, at the server {at_server}, echoed {echoed}"
    );
    let line = startup_line(&d);
    ensure!(
        line.contains("uplink hook taken over") && line.contains("adopted 1 slot(s) [1]"),
        "{line}"
    );
    let after = filter_prog_id(&host, UPLINK)?;
    ensure!(
        after != before,
        "the uplink filter's program was not replaced"
    );
    verify_clean(&d, &rt)?;

    // Without an agent, cleanup finds the filter by its program and removes it.
    d.stop_with(nix::sys::signal::Signal::SIGKILL)?;
    let (p, bpffs) = (
        d.world.prefix.clone(),
        d.world.bpffs().display().to_string(),
    );
    let out = d.cli(&["cleanup", "--prefix", &p, "--bpffs", &bpffs])?;
    let text = String::from_utf8_lossy(&out.stdout);
    ensure!(
        out.status.success(),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    ensure!(
        filter_prog_id(&host, UPLINK).is_err(),
        "the uplink filter outlived cleanup: {text}"
    );
    ensure!(d.world.slot_namespaces().is_empty());
    Ok(())
}
