//! `GET /v1/verify` and `netagent verify` against a real `netagent up`: a healthy
//! agent reports no difference; breaking the kernel state from outside (with
//! `ip` and by writing the pinned maps) is reported difference by difference,
//! and undoing the breaks makes the report clean again.

use std::time::{Duration, Instant};

use anyhow::{Context, Result, ensure};
use aya::maps::{Array, HashMap, MapData};
use netagent::bpf::EgressRules;
use netagent::slot::{GuestLink, RateLimitSpec};
use netagent::verify::{DiffKind, Difference, VerifyReport};
use netagent_common::{
    FlowKey, MAP_NAT_EGRESS, MAP_RATE, MAP_SLOTS, MAP_VETH_SLOTS, NatEntry, SLOT_F_GUEST_VETH,
    SlotInfo,
};
use netagent_tests::daemon::{Daemon, Netns, ip};

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

/// The difference of `slot` and `kind` whose object contains `object`.
fn find<'a>(
    r: &'a VerifyReport,
    slot: Option<u32>,
    kind: DiffKind,
    object: &str,
) -> Option<&'a Difference> {
    r.differences
        .iter()
        .find(|d| d.slot == slot && d.kind == kind && d.object.contains(object))
}

/// Removes every tc filter from the ingress of `dev` in namespace `ns` the way
/// an outsider would (`tc filter del`).
fn detach_filters(ns: &str, dev: &str) -> Result<()> {
    let out = std::process::Command::new("tc")
        .args(["-n", ns, "filter", "del", "dev", dev, "ingress"])
        .output()?;
    ensure!(
        out.status.success(),
        "tc filter del dev {dev} ingress in {ns}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(())
}

/// CLOCK_MONOTONIC in nanoseconds (the clock of the datapath's flow stamps,
/// `bpf_ktime_get_coarse_ns`, and of the reaper).
fn monotonic_ns() -> Result<u64> {
    let t = nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC)?;
    Ok(t.tv_sec() as u64 * 1_000_000_000 + t.tv_nsec() as u64)
}

fn verify_cli(d: &Daemon, json: bool) -> Result<(i32, String)> {
    let socket = d.world.socket().display().to_string();
    let mut args = vec!["verify", "--socket", socket.as_str()];
    if json {
        args.push("--json");
    }
    let out = d.cli(&args)?;
    Ok((
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
    ))
}

#[test]
fn verify_lists_every_difference_and_nothing_on_a_healthy_agent() -> Result<()> {
    let Some(d) = Daemon::start("verify_lists_every_difference_and_nothing_on_a_healthy_agent")?
    else {
        return Ok(());
    };
    let rt = rt();
    let c = d.client();
    let p = d.world.prefix.clone();
    let host = d.world.host_ns.clone();

    // Healthy, with no slot and with four.
    let r = rt.block_on(c.verify())?;
    ensure!(r.clean && r.slots == 0, "{}", r.render());
    for n in 1..=4 {
        rt.block_on(c.create_slot(n, &GuestLink::Tap))?;
    }
    // A veth guest link too (its tap0 is a veth, not a TAP).
    let guest = Netns::add(&format!("{p}-guest"))?;
    let veth_guest = GuestLink::Veth {
        guest_netns: guest.name.clone(),
    };
    rt.block_on(c.create_slot(6, &veth_guest))?;
    // With a policy (egress rules in a different order than the maps keep
    // them, a bandwidth limit): read back from the maps, it matches.
    rt.block_on(c.set_egress(
        6,
        &EgressRules {
            allow: vec!["198.18.0.0/15".parse()?],
            deny: vec!["198.51.100.0/24".parse()?, "10.0.0.0/8".parse()?],
        },
    ))?;
    rt.block_on(c.set_rate_limit(
        6,
        Some(&RateLimitSpec {
            bits_per_second: 123_456_784,
            burst_bytes: 65_537,
        }),
    ))?;
    let started = Instant::now();
    let r = rt.block_on(c.verify())?;
    let took = started.elapsed();
    ensure!(
        r.clean && r.slots == 5 && r.differences.is_empty(),
        "{}",
        r.render()
    );
    eprintln!("verify of 5 slots (max_slots 1024) took {took:?}");
    let (code, text) = verify_cli(&d, false)?;
    ensure!(code == 0 && text.contains("matches"), "exit {code}: {text}");

    // Break things from outside.
    // 1. The host route of slot 1.
    ip(&["-n", &host, "route", "del", "10.11.0.1/32"])?;
    // 2. Slot 2's tap0.
    ip(&["-n", &format!("{p}-ns-2"), "link", "del", "tap0"])?;
    // 3. Slot 3's default route, its host veth down, its VETH_SLOTS entry.
    ip(&["-n", &format!("{p}-ns-3"), "route", "del", "default"])?;
    ip(&["-n", &host, "link", "set", &format!("{p}-veth-3"), "down"])?;
    let pins = d.world.bpffs();
    let mut veth_slots: HashMap<MapData, u32, u32> = HashMap::try_from(aya::maps::Map::HashMap(
        MapData::from_pin(pins.join(MAP_VETH_SLOTS)).context("open the VETH_SLOTS pin")?,
    ))?;
    let veth3 = veth_slots
        .iter()
        .filter_map(Result::ok)
        .find(|(_, slot)| *slot == 3)
        .map(|(ifindex, _)| ifindex)
        .context("no VETH_SLOTS entry of slot 3")?;
    veth_slots.remove(&veth3)?;
    // 4. Slot 4's tap0 gets another MAC and txqueuelen.
    let ns4 = format!("{p}-ns-4");
    ip(&[
        "-n",
        &ns4,
        "link",
        "set",
        "tap0",
        "address",
        "02:00:00:00:00:44",
    ])?;
    ip(&["-n", &ns4, "link", "set", "tap0", "txqueuelen", "10"])?;
    //    and its tap_ingress is detached (`tc filter del`),
    detach_filters(&ns4, "tap0")?;
    //    and its SLOTS entry says its TAP is a veth.
    let mut slots: Array<MapData, SlotInfo> = Array::try_from(aya::maps::Map::Array(
        MapData::from_pin(pins.join(MAP_SLOTS)).context("open the SLOTS pin")?,
    ))?;
    let mut info4 = slots.get(&4, 0)?;
    info4.flags |= SLOT_F_GUEST_VETH;
    slots.set(4, info4, 0)?;
    //    and a bandwidth limit the agent never set.
    let mut rate: Array<MapData, netagent_common::RateLimit> = Array::try_from(
        aya::maps::Map::Array(MapData::from_pin(pins.join(MAP_RATE)).context("open the RATE pin")?),
    )?;
    rate.set(
        4,
        netagent_common::RateLimit {
            rate_bytes_per_sec: 1000,
            burst_ns: 1_000_000_000,
            next_ns: 0,
        },
        0,
    )?;
    // 5. Orphans: a namespace and a veth of slot 999, a host route of slot 998,
    //    a NAT entry of slot 777.
    ip(&["netns", "add", &format!("{p}-ns-999")])?;
    let orphan_veth = format!("{p}-veth-999");
    ip(&[
        "-n",
        &host,
        "link",
        "add",
        &orphan_veth,
        "type",
        "veth",
        "peer",
        "name",
        "o999",
    ])?;
    // 10.11.3.230 = host_base + 998.
    ip(&[
        "-n",
        &host,
        "route",
        "add",
        "10.11.3.230/32",
        "via",
        "198.18.0.2",
    ])?;
    let mut nat: HashMap<MapData, FlowKey, NatEntry> = HashMap::try_from(aya::maps::Map::HashMap(
        MapData::from_pin(pins.join(MAP_NAT_EGRESS))?,
    ))?;
    let orphan_key = FlowKey::new(
        u32::from_ne_bytes([10, 12, 6, 19]),
        u32::from_ne_bytes([198, 18, 0, 2]),
        4000u16.to_be(),
        80u16.to_be(),
        6,
    );
    nat.insert(
        orphan_key,
        NatEntry {
            slot: 777,
            // Fresh and established, so the reaper leaves it alone.
            last_seen_ns: monotonic_ns()?,
            state: netagent_common::STATE_SYN | netagent_common::STATE_REPLIED,
            ..NatEntry::default()
        },
        0,
    )?;

    let r = rt.block_on(c.verify())?;
    let text = r.render();
    ensure!(!r.clean && r.slots == 5, "{text}");
    ensure!(
        r.differences.iter().all(|x| x.slot != Some(6)),
        "the intact veth slot has differences:\n{text}"
    );
    let expected: Vec<(Option<u32>, DiffKind, String)> = vec![
        (
            Some(1),
            DiffKind::Missing,
            "route 10.11.0.1/32 (host namespace)".into(),
        ),
        (Some(2), DiffKind::Missing, "link tap0".into()),
        (Some(3), DiffKind::Missing, "route 0.0.0.0/0".into()),
        (
            Some(3),
            DiffKind::Mismatch,
            format!("state of link {p}-veth-3"),
        ),
        (Some(3), DiffKind::Missing, "map VETH_SLOTS".into()),
        (Some(4), DiffKind::Mismatch, "MAC of link tap0".into()),
        (
            Some(4),
            DiffKind::Mismatch,
            "txqueuelen of link tap0".into(),
        ),
        (
            Some(4),
            DiffKind::Mismatch,
            "program tap_ingress on tap0".into(),
        ),
        (
            Some(4),
            DiffKind::Mismatch,
            "map SLOTS[4].flags.GUEST_VETH".into(),
        ),
        (Some(4), DiffKind::Mismatch, "map RATE[4]".into()),
        (Some(999), DiffKind::Orphan, format!("namespace {p}-ns-999")),
        (Some(999), DiffKind::Orphan, format!("link {orphan_veth}")),
        (Some(998), DiffKind::Orphan, "route 10.11.3.230/32".into()),
        (Some(777), DiffKind::Orphan, "map NAT_EGRESS".into()),
    ];
    for (slot, kind, object) in &expected {
        ensure!(
            find(&r, *slot, *kind, object).is_some(),
            "not reported: {slot:?} {kind:?} {object}\n{text}"
        );
    }
    // Exact details of two of them.
    let route = find(&r, Some(1), DiffKind::Missing, "route 10.11.0.1/32").unwrap();
    ensure!(
        route.expected == format!("10.11.0.1/32 via 10.12.0.3 dev {p}-veth-1"),
        "{route:?}"
    );
    let limit = find(&r, Some(4), DiffKind::Mismatch, "map RATE[4]").unwrap();
    ensure!(
        limit.expected == "none" && limit.found == "1000 B/s, burst 1000 B",
        "{limit:?}"
    );
    let mac = find(&r, Some(4), DiffKind::Mismatch, "MAC of link tap0").unwrap();
    ensure!(
        mac.expected == "02:fc:00:00:00:05" && mac.found == "02:00:00:00:00:44",
        "{mac:?}"
    );
    // Nothing beyond what was broken: every difference is about slots 1-4 as
    // broken above or an orphan; the uplink and slot 1's other objects are fine.
    ensure!(
        r.differences.iter().all(|x| x.slot.is_some()),
        "agent-wide differences:\n{text}"
    );
    ensure!(
        r.differences.iter().filter(|x| x.slot == Some(1)).count() == 1,
        "slot 1 has more than its route:\n{text}"
    );
    eprintln!("{text}");

    // The CLI says the same and exits 1; --json is the API's report.
    let (code, out) = verify_cli(&d, false)?;
    ensure!(code == 1, "exit {code}: {out}");
    for line in text.lines().skip(1) {
        ensure!(out.contains(line), "CLI lacks {line:?}:\n{out}");
    }
    let (code, out) = verify_cli(&d, true)?;
    let json: VerifyReport = serde_json::from_str(&out)?;
    ensure!(
        code == 1 && json == r,
        "exit {code}:\n{}\nvs the API's\n{text}",
        json.render()
    );

    // Undo the orphans and delete the broken slots: clean again.
    nat.remove(&orphan_key)?;
    ip(&["netns", "del", &format!("{p}-ns-999")])?;
    ip(&["-n", &host, "link", "del", &orphan_veth])?;
    ip(&["-n", &host, "route", "del", "10.11.3.230/32"])?;
    for n in [1, 2, 3, 4, 6] {
        rt.block_on(c.delete_slot(n))?;
    }
    rt.block_on(c.create_slot(5, &GuestLink::Tap))?;
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let r = rt.block_on(c.verify())?;
        if r.clean {
            ensure!(r.slots == 1);
            break;
        }
        // A deleted namespace may take a moment to go from /run/netns.
        ensure!(Instant::now() < deadline, "{}", r.render());
        std::thread::sleep(Duration::from_millis(100));
    }
    let (code, _) = verify_cli(&d, false)?;
    ensure!(code == 0);
    Ok(())
}

#[test]
fn verify_during_concurrent_creates_and_deletes_reports_nothing() -> Result<()> {
    let Some(d) = Daemon::start("verify_during_concurrent_creates_and_deletes_reports_nothing")?
    else {
        return Ok(());
    };
    let rt = rt();
    let c = d.client();
    rt.block_on(async {
        let churn: Vec<_> = (1..=8)
            .map(|n| {
                let c = c.clone();
                tokio::spawn(async move {
                    for _ in 0..5 {
                        c.create_slot(n, &GuestLink::Tap).await?;
                        c.delete_slot(n).await?;
                    }
                    anyhow::Ok(())
                })
            })
            .collect();
        let mut reports = 0;
        while !churn.iter().all(|t| t.is_finished()) {
            let r = c.verify().await?;
            ensure!(r.clean, "during churn:\n{}", r.render());
            reports += 1;
        }
        for t in churn {
            t.await??;
        }
        eprintln!("{reports} clean reports during 40 creates and 40 deletes");
        ensure!(reports > 0);
        let r = c.verify().await?;
        ensure!(r.clean && r.slots == 0, "{}", r.render());
        Ok(())
    })
}
