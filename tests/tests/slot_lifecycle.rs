//! Slot lifecycle against the real kernel, in a throwaway world: what create
//! makes (checked with `ip -j`, independently of netagent's netlink code), that a
//! failure at every step of create leaves nothing behind, that delete leaves
//! nothing behind (links, routes, namespaces, map entries), idempotency, unknown
//! slots, start-up after a crash, and that no iptables rule or ip_forward is used.

use std::collections::BTreeSet;
use std::net::Ipv4Addr;
use std::os::fd::AsFd;

use anyhow::{Context, Result, bail, ensure};
use netagent::bpf::FlowTable;
use netagent::netlink::{netns, tap};
use netagent::slot::{CreateStep, DeleteStep, GuestLink, SlotError};
use netagent_tests::world::{Agent, World};
use serde_json::Value;

/// Everything of the world the agent could leave behind, as seen by `ip -j`.
#[derive(Debug, PartialEq, Eq)]
struct Snapshot {
    namespaces: BTreeSet<String>,
    host_links: BTreeSet<String>,
    host_addrs: BTreeSet<String>,
    host_routes: BTreeSet<String>,
    guest_links: BTreeSet<String>,
}

fn names(v: &Value, key: &str) -> BTreeSet<String> {
    v.as_array()
        .into_iter()
        .flatten()
        .filter_map(|e| e[key].as_str().map(str::to_string))
        .collect()
}

fn routes(v: &Value) -> BTreeSet<String> {
    v.as_array()
        .into_iter()
        .flatten()
        .map(|r| {
            format!(
                "{} via {} dev {}",
                r["dst"].as_str().unwrap_or("?"),
                r["gateway"].as_str().unwrap_or("-"),
                r["dev"].as_str().unwrap_or("?")
            )
        })
        .collect()
}

fn addrs(v: &Value) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    for link in v.as_array().into_iter().flatten() {
        for a in link["addr_info"].as_array().into_iter().flatten() {
            if a["family"] == "inet" {
                out.insert(format!(
                    "{} {}/{}",
                    link["ifname"].as_str().unwrap_or("?"),
                    a["local"].as_str().unwrap_or("?"),
                    a["prefixlen"]
                ));
            }
        }
    }
    out
}

fn snapshot(world: &World, guest_ns: Option<&str>) -> Result<Snapshot> {
    let host = world.host_name();
    // Deleted slots' veth pairs go when the kernel frees their namespaces.
    netagent_tests::leaks::wait_for_retired_links(
        &host,
        world.prefix(),
        netagent_tests::leaks::RETIRED_LINKS_TIMEOUT,
    )?;
    Ok(Snapshot {
        namespaces: world.namespaces().into_iter().collect(),
        host_links: names(&world.ip_json(Some(&host), &["link", "show"])?, "ifname"),
        host_addrs: addrs(&world.ip_json(Some(&host), &["addr", "show"])?),
        host_routes: routes(&world.ip_json(Some(&host), &["route", "show"])?),
        guest_links: match guest_ns {
            Some(g) => names(&world.ip_json(Some(g), &["link", "show"])?, "ifname"),
            None => BTreeSet::new(),
        },
    })
}

/// Map entries of any slot: SLOTS entries marked active, ADDR_SLOTS, VETH_SLOTS,
/// and flows of the slot — once they are gone, or as they are after 2 s (a
/// delete removes the slot's flows right after it has answered).
fn map_entries(agent: &Agent, index: u32) -> Result<Vec<String>> {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(2);
    loop {
        let entries = map_entries_now(agent, index)?;
        if entries.is_empty() || std::time::Instant::now() > deadline {
            return Ok(entries);
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
}

fn map_entries_now(agent: &Agent, index: u32) -> Result<Vec<String>> {
    let m = agent.manager();
    let out = m.with_datapath(|dp| -> Result<Vec<String>> {
        let maps = dp.maps();
        let mut out = Vec::new();
        let info = maps.slot(index)?;
        if info.flags != 0 {
            out.push(format!("SLOTS[{index}] = {info:?}"));
        }
        for (addr, i) in maps.addr_slots()? {
            out.push(format!("ADDR_SLOTS[{addr}] = {i}"));
        }
        for (ifindex, i) in maps.veth_slots()? {
            out.push(format!("VETH_SLOTS[{ifindex}] = {i}"));
        }
        for t in [
            FlowTable::NatEgress,
            FlowTable::NatIngress,
            FlowTable::HostFlows,
        ] {
            for (k, e) in maps.flows(t)? {
                if e.slot == index {
                    out.push(format!("{t:?} {k:?}"));
                }
            }
        }
        Ok(out)
    })??;
    Ok(out)
}

fn ip_forward_everywhere(world: &World) -> Result<Vec<(String, String)>> {
    let mut out = Vec::new();
    for name in world.namespaces() {
        let ns = netns::open(&name)?;
        let v = netagent::netlink::sysctl::read_in(ns.as_fd(), "net.ipv4.ip_forward")?;
        out.push((name, v));
    }
    Ok(out)
}

/// `-A` rules of iptables-save and the nft ruleset in namespace `ns`.
fn firewall_rules(ns: &str) -> Result<Vec<String>> {
    let mut rules = Vec::new();
    if std::path::Path::new("/usr/sbin/iptables-save").exists() {
        let out = std::process::Command::new("ip")
            .args(["netns", "exec", ns, "iptables-save"])
            .output()?;
        rules.extend(
            String::from_utf8_lossy(&out.stdout)
                .lines()
                .filter(|l| l.starts_with("-A"))
                .map(str::to_string),
        );
    }
    if std::path::Path::new("/usr/sbin/nft").exists() {
        let out = std::process::Command::new("ip")
            .args(["netns", "exec", ns, "nft", "list", "ruleset"])
            .output()?;
        rules.extend(
            String::from_utf8_lossy(&out.stdout)
                .lines()
                .filter(|l| !l.trim().is_empty())
                .map(str::to_string),
        );
    }
    Ok(rules)
}

fn link<'a>(v: &'a Value, name: &str) -> Result<&'a Value> {
    v.as_array()
        .into_iter()
        .flatten()
        .find(|l| l["ifname"] == name)
        .with_context(|| format!("no link {name} in {v}"))
}

fn inet(link: &Value) -> Vec<String> {
    link["addr_info"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|a| a["family"] == "inet")
        .map(|a| format!("{}/{}", a["local"].as_str().unwrap_or("?"), a["prefixlen"]))
        .collect()
}

fn is_up(link: &Value) -> bool {
    link["flags"]
        .as_array()
        .into_iter()
        .flatten()
        .any(|f| f == "UP")
}

#[test]
fn create_makes_exactly_what_the_design_says() -> Result<()> {
    let Some(world) = World::new()? else {
        return Ok(());
    };
    let agent = world.start_agent(|_| {})?;
    let p = world.prefix().to_string();
    let host = world.host_name();

    for (index, host_ip, veth_ip, vpeer_ip) in [
        (1u32, "10.11.0.1", "10.12.0.2", "10.12.0.3"),
        (300, "10.11.1.44", "10.12.2.88", "10.12.2.89"),
    ] {
        let (slot, created) =
            agent.run(move |m| async move { m.create(index.into(), GuestLink::Tap).await })??;
        ensure!(created);
        assert_eq!(slot.namespace, format!("{p}-ns-{index}"));
        assert_eq!(slot.veth, format!("{p}-veth-{index}"));
        assert_eq!(slot.host_ip.to_string(), host_ip);
        assert_eq!(slot.veth_ip.to_string(), veth_ip);
        assert_eq!(slot.vpeer_ip.to_string(), vpeer_ip);
        ensure!(
            netns::exists(&slot.namespace),
            "namespace {} missing",
            slot.namespace
        );

        // Host side.
        let links = world.ip_json(Some(&host), &["addr", "show"])?;
        let veth = link(&links, &slot.veth)?;
        assert_eq!(inet(veth), vec![format!("{veth_ip}/31")]);
        ensure!(is_up(veth));
        // The pair's MACs are the slot's, given at creation (02:6e:61:00|01:index).
        let (hi, lo) = (index >> 8, index & 0xff);
        assert_eq!(veth["address"], format!("02:6e:61:00:{hi:02x}:{lo:02x}"));
        let routes = world.ip_json(Some(&host), &["route", "show", host_ip])?;
        let r = &routes[0];
        assert_eq!(r["gateway"], vpeer_ip, "{routes}");
        assert_eq!(r["dev"], slot.veth.as_str(), "{routes}");

        // Slot side.
        let ns = slot.namespace.as_str();
        let links = world.ip_json(Some(ns), &["-d", "addr", "show"])?;
        let names = names(&links, "ifname");
        assert_eq!(
            names,
            ["eth0", "lo", "tap0"]
                .into_iter()
                .map(String::from)
                .collect()
        );
        let eth0 = link(&links, "eth0")?;
        assert_eq!(inet(eth0), vec![format!("{vpeer_ip}/31")]);
        assert_eq!(eth0["address"], format!("02:6e:61:01:{hi:02x}:{lo:02x}"));
        assert_eq!(
            eth0["ifindex"],
            netagent_common::SLOT_ETH0_IFINDEX,
            "eth0 has the ifindex the shared tap_ingress redirects to"
        );
        ensure!(is_up(eth0));
        ensure!(is_up(link(&links, "lo")?));
        let tap0 = link(&links, "tap0")?;
        assert_eq!(inet(tap0), vec!["169.254.0.22/30".to_string()]);
        assert_eq!(tap0["address"], "02:fc:00:00:00:05");
        assert_eq!(tap0["txqlen"], 5000);
        ensure!(is_up(tap0));
        let info = &tap0["linkinfo"];
        assert_eq!(info["info_kind"], "tun", "{info}");
        assert_eq!(info["info_data"]["type"], "tap", "{info}");
        assert_eq!(info["info_data"]["persist"], true, "{info}");
        let routes = world.ip_json(Some(ns), &["route", "show", "default"])?;
        assert_eq!(routes[0]["gateway"], veth_ip, "{routes}");
        assert_eq!(routes[0]["dev"], "eth0", "{routes}");

        // A VMM can open the TAP the way Firecracker does.
        let slot_ns = netns::open(ns)?;
        netns::run_in(slot_ns.as_fd(), || -> Result<()> {
            let f = std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .open("/dev/net/tun")?;
            tap::set_iff(
                &f,
                "tap0",
                tap::IFF_TAP | tap::IFF_NO_PI | tap::IFF_VNET_HDR,
            )?;
            Ok(())
        })??;

        // Datapath entries.
        let entries = map_entries(&agent, index)?;
        ensure!(
            entries
                .iter()
                .any(|e| e.starts_with(&format!("SLOTS[{index}]"))),
            "{entries:?}"
        );
        let veth_ifindex =
            link(&world.ip_json(Some(&host), &["link", "show"])?, &slot.veth)?["ifindex"].clone();
        ensure!(
            entries.contains(&format!("VETH_SLOTS[{veth_ifindex}] = {index}")),
            "{entries:?}"
        );
        for addr in [host_ip, vpeer_ip] {
            ensure!(
                entries.contains(&format!("ADDR_SLOTS[{addr}] = {index}")),
                "{entries:?}"
            );
        }
    }

    // No forwarding and no firewall rules anywhere.
    for (ns, v) in ip_forward_everywhere(&world)? {
        assert_eq!(v, "0", "ip_forward is on in {ns}");
    }
    for ns in world.namespaces() {
        let rules = firewall_rules(&ns)?;
        ensure!(rules.is_empty(), "firewall rules in {ns}: {rules:?}");
    }
    // LOCAL_ADDRS holds the agent namespace's addresses.
    let locals = agent
        .manager()
        .with_datapath(|dp| dp.maps().local_addrs())??;
    for a in [Ipv4Addr::new(198, 18, 0, 1), Ipv4Addr::LOCALHOST] {
        ensure!(locals.contains(&a), "LOCAL_ADDRS lacks {a}: {locals:?}");
    }
    assert_eq!(agent.manager().uplink().name, "up0");
    assert_eq!(agent.manager().uplink().ipv4, Ipv4Addr::new(198, 18, 0, 1));
    // The slot namespaces carry IPv4 only.
    let v6 = world.ip_json(Some(&format!("{p}-ns-1")), &["-6", "addr", "show"])?;
    ensure!(
        v6.as_array().is_none_or(|a| a
            .iter()
            .all(|l| l["addr_info"].as_array().is_none_or(|x| x.is_empty()))),
        "IPv6 addresses in the slot namespace: {v6}"
    );
    // The masquerade range is reserved in the host namespace only.
    let reserved =
        world.in_host(|| netagent::netlink::sysctl::read("net.ipv4.ip_local_reserved_ports"))??;
    assert_eq!(reserved, "10000-32767");
    agent.shutdown()?;
    let reserved =
        world.in_host(|| netagent::netlink::sysctl::read("net.ipv4.ip_local_reserved_ports"))??;
    assert_eq!(reserved, "");
    Ok(())
}

#[test]
fn create_failure_at_each_step_leaves_nothing_behind() -> Result<()> {
    let Some(world) = World::new()? else {
        return Ok(());
    };
    let agent = world.start_agent(|_| {})?;
    let guest_ns = world.guest_namespace(1)?;
    let before = snapshot(&world, Some(&guest_ns))?;
    let m = agent.manager();

    for step in CreateStep::ALL {
        let guests: Vec<GuestLink> = match step {
            CreateStep::GuestConfig => vec![GuestLink::Veth {
                guest_netns: guest_ns.clone(),
            }],
            _ => vec![
                GuestLink::Tap,
                GuestLink::Veth {
                    guest_netns: guest_ns.clone(),
                },
            ],
        };
        for guest in guests {
            m.set_fail_at(Some(step));
            let g = guest.clone();
            let err = agent
                .run(|m| async move { m.create(7, g).await })?
                .err()
                .with_context(|| format!("create with failure at {step} succeeded"))?;
            match &err {
                SlotError::Create {
                    step: s, rollback, ..
                } => {
                    assert_eq!(*s, step, "{err}");
                    ensure!(rollback.is_empty(), "rollback failed: {err}");
                }
                other => bail!("unexpected error at {step}: {other}"),
            }
            let after = snapshot(&world, Some(&guest_ns))?;
            assert_eq!(
                before, after,
                "leftovers after a failure at {step} ({guest:?})"
            );
            let entries = map_entries(&agent, 7)?;
            ensure!(
                entries.is_empty(),
                "map entries after a failure at {step}: {entries:?}"
            );
            ensure!(m.get(7).is_err(), "slot 7 listed after a failed create");

            // Nothing blocks a clean create afterwards.
            m.set_fail_at(None);
            let g = guest.clone();
            agent.run(|m| async move { m.create(7, g).await })??;
            agent.run(|m| async move { m.delete(7).await })??;
            assert_eq!(before, snapshot(&world, Some(&guest_ns))?);
        }
    }
    Ok(())
}

#[test]
fn delete_leaves_nothing_behind() -> Result<()> {
    let Some(world) = World::new()? else {
        return Ok(());
    };
    let agent = world.start_agent(|_| {})?;
    let guest_ns = world.guest_namespace(2)?;
    let before = snapshot(&world, Some(&guest_ns))?;

    agent.run(|m| async move { m.create(1, GuestLink::Tap).await })??;
    let g = GuestLink::Veth {
        guest_netns: guest_ns.clone(),
    };
    agent.run(|m| async move { m.create(2, g).await })??;
    // The veth guest link put a configured eth0 into the guest namespace.
    let links = world.ip_json(Some(&guest_ns), &["addr", "show"])?;
    assert_eq!(
        inet(link(&links, "eth0")?),
        vec!["169.254.0.21/30".to_string()]
    );
    let routes = world.ip_json(Some(&guest_ns), &["route", "show", "default"])?;
    assert_eq!(routes[0]["gateway"], "169.254.0.22");
    ensure!(snapshot(&world, Some(&guest_ns))? != before);

    agent.run(|m| async move { m.delete(1).await })??;
    agent.run(|m| async move { m.delete(2).await })??;
    assert_eq!(before, snapshot(&world, Some(&guest_ns))?);
    for index in [1, 2] {
        let entries = map_entries(&agent, index)?;
        ensure!(
            entries.is_empty(),
            "map entries left for slot {index}: {entries:?}"
        );
    }
    ensure!(agent.manager().list().is_empty());
    Ok(())
}

#[test]
fn create_is_idempotent_and_bad_requests_are_clear() -> Result<()> {
    let Some(world) = World::new()? else {
        return Ok(());
    };
    let agent = world.start_agent(|_| {})?;
    let (a, created) = agent.run(|m| async move { m.create(3, GuestLink::Tap).await })??;
    ensure!(created);
    let (b, created) = agent.run(|m| async move { m.create(3, GuestLink::Tap).await })??;
    ensure!(!created, "second create reported created");
    assert_eq!(a, b);
    let g = GuestLink::Veth {
        guest_netns: "whatever".into(),
    };
    let err = agent
        .run(|m| async move { m.create(3, g).await })?
        .unwrap_err();
    ensure!(matches!(err, SlotError::Conflict(_)), "{err}");

    for bad in [0i64, -1, 32768, 512, i64::MAX] {
        let err = agent
            .run(move |m| async move { m.create(bad, GuestLink::Tap).await })?
            .unwrap_err();
        ensure!(matches!(err, SlotError::InvalidIndex(_)), "{bad}: {err}");
    }
    let g = GuestLink::Veth {
        guest_netns: format!("{}-nosuch", world.prefix()),
    };
    let err = agent
        .run(|m| async move { m.create(4, g).await })?
        .unwrap_err();
    ensure!(matches!(err, SlotError::GuestNamespaceMissing(_)), "{err}");
    ensure!(!netns::exists(&format!("{}-ns-4", world.prefix())));

    let err = agent
        .run(|m| async move { m.delete(5).await })?
        .unwrap_err();
    ensure!(matches!(err, SlotError::NotFound(5)), "{err}");
    ensure!(matches!(
        agent.manager().get(5),
        Err(SlotError::NotFound(5))
    ));
    ensure!(matches!(
        agent.manager().stats(5),
        Err(SlotError::NotFound(5))
    ));
    assert_eq!(agent.manager().list().len(), 1);
    Ok(())
}

#[test]
fn start_after_a_crash_removes_leftovers() -> Result<()> {
    let Some(world) = World::new()? else {
        return Ok(());
    };
    let p = world.prefix().to_string();
    let host = world.host_name();
    let baseline = snapshot(&world, None)?;
    {
        let agent = world.start_agent(|_| {})?;
        for i in [1i64, 2, 3] {
            agent.run(move |m| async move { m.create(i, GuestLink::Tap).await })??;
        }
        // Killed: the agent goes away without deleting anything.
        drop(agent);
    }
    // And a half-made slot of a create that was interrupted.
    netns::create(&format!("{p}-ns-9"))?;
    let left = snapshot(&world, None)?;
    ensure!(
        left.namespaces.len() == baseline.namespaces.len() + 4,
        "{left:?}"
    );
    ensure!(left.host_links.contains(&format!("{p}-veth-2")));

    let agent = world.start_agent(|_| {})?;
    assert_eq!(
        baseline,
        snapshot(&world, None)?,
        "start did not remove the leftovers"
    );
    let routes = world.ip_json(Some(&host), &["route", "show"])?;
    ensure!(
        !routes.to_string().contains("10.11.0."),
        "HostIP routes left: {routes}"
    );
    // The slots can be made again.
    agent.run(|m| async move { m.create(2, GuestLink::Tap).await })??;
    agent.shutdown()?;
    assert_eq!(baseline, snapshot(&world, None)?);

    // And `netagent cleanup` removes a crashed run's slots with no agent at all.
    let agent = world.start_agent(|_| {})?;
    agent.run(|m| async move { m.create(5, GuestLink::Tap).await })??;
    drop(agent);
    ensure!(snapshot(&world, None)? != baseline);
    let prefix = p.clone();
    let bpffs = world.config().bpffs;
    let report = world.in_host(move || {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap()
            .block_on(netagent::cleanup::cleanup(&prefix, &bpffs))
    })??;
    assert_eq!(report.namespaces, vec![format!("{p}-ns-5")]);
    assert_eq!(report.links, vec![format!("{p}-veth-5")]);
    assert_eq!(baseline, snapshot(&world, None)?);
    Ok(())
}

#[test]
fn concurrent_creates_of_distinct_slots() -> Result<()> {
    let Some(world) = World::new()? else {
        return Ok(());
    };
    let agent = world.start_agent(|_| {})?;
    let before = snapshot(&world, None)?;
    let created = agent.run(|m| async move {
        let tasks: Vec<_> = (1..=16i64)
            .map(|i| {
                let m = m.clone();
                tokio::spawn(async move { m.create(i, GuestLink::Tap).await })
            })
            .collect();
        let mut out = Vec::new();
        for t in tasks {
            out.push(t.await.map_err(|e| anyhow::anyhow!("{e}"))??);
        }
        anyhow::Ok(out)
    })??;
    let ips: BTreeSet<Ipv4Addr> = created.iter().map(|(s, _)| s.host_ip).collect();
    assert_eq!(ips.len(), 16);
    let listed: Vec<u32> = agent
        .manager()
        .list()
        .iter()
        .map(|s| s.addr.index)
        .collect();
    assert_eq!(listed, (1..=16).collect::<Vec<_>>());
    // Same index concurrently: one creates, the others see it exist.
    let results = agent.run(|m| async move {
        let tasks: Vec<_> = (0..8)
            .map(|_| {
                let m = m.clone();
                tokio::spawn(async move { m.create(20, GuestLink::Tap).await })
            })
            .collect();
        let mut out = Vec::new();
        for t in tasks {
            out.push(t.await.map_err(|e| anyhow::anyhow!("{e}"))??.1);
        }
        anyhow::Ok(out)
    })??;
    assert_eq!(results.iter().filter(|c| **c).count(), 1, "{results:?}");
    agent.run(|m| async move {
        let tasks: Vec<_> = (1..=16i64)
            .chain([20])
            .map(|i| {
                let m = m.clone();
                tokio::spawn(async move { m.delete(i).await })
            })
            .collect();
        for t in tasks {
            t.await.map_err(|e| anyhow::anyhow!("{e}"))??;
        }
        anyhow::Ok(())
    })??;
    assert_eq!(before, snapshot(&world, None)?);
    Ok(())
}

#[test]
fn start_with_a_configured_or_a_bad_uplink() -> Result<()> {
    let Some(world) = World::new()? else {
        return Ok(());
    };
    let agent = world.start_agent(|c| c.uplink = Some("up0".into()))?;
    assert_eq!(agent.manager().uplink().name, "up0");
    agent.shutdown()?;
    let err = world
        .start_agent(|c| c.uplink = Some("nosuch0".into()))
        .err()
        .context("start with a missing uplink succeeded")?;
    let msg = format!("{err:#}");
    ensure!(msg.contains("nosuch0") && msg.contains("--uplink"), "{msg}");
    // Without a default route and no --uplink the error says what to pass.
    world.netlink(&world.host_name(), async |nl| {
        nl.route_del_dst(Ipv4Addr::UNSPECIFIED, 0).await?;
        Ok(())
    })?;
    let err = world
        .start_agent(|_| {})
        .err()
        .context("start without a default route succeeded")?;
    let msg = format!("{err:#}");
    ensure!(
        msg.contains("no default route") && msg.contains("--uplink"),
        "{msg}"
    );
    // A failed start leaves the reserved ports as they were.
    let reserved =
        world.in_host(|| netagent::netlink::sysctl::read("net.ipv4.ip_local_reserved_ports"))??;
    assert_eq!(reserved, "");
    Ok(())
}

#[test]
fn delete_tries_every_step_and_reports_all_failures() -> Result<()> {
    let Some(world) = World::new()? else {
        return Ok(());
    };
    let agent = world.start_agent(|_| {})?;
    let guest_ns = world.guest_namespace(3)?;
    let before = snapshot(&world, Some(&guest_ns))?;
    let m = agent.manager();
    let g = GuestLink::Veth {
        guest_netns: guest_ns.clone(),
    };
    agent.run(|m| async move { m.create(3, g).await })??;

    // Two steps fail: both are reported, every other step still ran.
    m.set_fail_delete(&[DeleteStep::HostRoute, DeleteStep::Namespace]);
    let err = agent
        .run(|m| async move { m.delete(3).await })?
        .unwrap_err();
    match &err {
        SlotError::Delete { failures, .. } => {
            assert_eq!(failures.len(), 2, "{err}");
            ensure!(
                failures[0].contains("host route") && failures[1].contains("namespace"),
                "{err}"
            );
        }
        other => bail!("unexpected error {other}"),
    }
    // The steps that did not fail were done.
    let host = world.host_name();
    let links = names(&world.ip_json(Some(&host), &["link", "show"])?, "ifname");
    ensure!(
        !links.contains(&format!("{}-veth-3", world.prefix())),
        "host veth not deleted"
    );
    ensure!(map_entries(&agent, 3)?.is_empty());
    // The slot stays listed so the delete can be retried, and the retry finishes.
    ensure!(m.get(3).is_ok());
    m.set_fail_delete(&[]);
    agent.run(|m| async move { m.delete(3).await })??;
    ensure!(m.get(3).is_err());
    assert_eq!(before, snapshot(&world, Some(&guest_ns))?);
    Ok(())
}

#[test]
fn delete_treats_already_gone_as_done() -> Result<()> {
    let Some(world) = World::new()? else {
        return Ok(());
    };
    let agent = world.start_agent(|_| {})?;
    let before = snapshot(&world, None)?;
    let p = world.prefix().to_string();
    agent.run(|m| async move { m.create(4, GuestLink::Tap).await })??;
    // Someone removed the namespace and the veth behind the agent's back.
    let host = world.host_name();
    for args in [
        vec!["netns", "del", &format!("{p}-ns-4")],
        vec!["-n", &host, "link", "del", &format!("{p}-veth-4")],
    ] {
        let st = std::process::Command::new("ip").args(&args).status()?;
        ensure!(st.success(), "ip {args:?}");
    }
    agent.run(|m| async move { m.delete(4).await })??;
    assert_eq!(before, snapshot(&world, None)?);
    ensure!(map_entries(&agent, 4)?.is_empty());
    Ok(())
}

/// Ids of every program loaded on the machine (`BPF_PROG_GET_NEXT_ID`).
fn loaded_program_ids() -> BTreeSet<u32> {
    aya::programs::loaded_programs()
        .filter_map(|info| info.ok().map(|i| i.id()))
        .collect()
}

/// Ids of the programs attached (tc filters on ingress) to `dev` in namespace
/// `ns`, with the filters' priority and handle.
fn filter_ids(ns: &str, dev: &str) -> Result<Vec<(u32, u64, String)>> {
    let out = std::process::Command::new("tc")
        .args(["-n", ns, "-j", "filter", "show", "dev", dev, "ingress"])
        .output()?;
    anyhow::ensure!(out.status.success(), "tc filter show dev {dev} in {ns}");
    let filters: Vec<serde_json::Value> = serde_json::from_slice(&out.stdout)?;
    Ok(filters
        .iter()
        .filter_map(|f| {
            let id = f.pointer("/options/prog/id")?.as_u64()? as u32;
            let pref = f["pref"].as_u64()?;
            let handle = f.pointer("/options/handle")?.as_str()?.to_string();
            Some((id, pref, handle))
        })
        .collect())
}

/// Slots cost links and map entries only: creating ten slots loads no program
/// (the kernel's list of loaded programs, read before, already holds every
/// program the ten slots' tap0, eth0 and host veth run, one per hook for all ten),
/// and every slot's `eth0` has SLOT_ETH0_IFINDEX.
#[test]
fn slots_share_the_programs_loaded_once() -> Result<()> {
    let Some(world) = World::new()? else {
        return Ok(());
    };
    let agent = world.start_agent(|_| {})?;
    let before = loaded_program_ids();
    let host = world.host_name();
    let mut per_hook: [BTreeSet<u32>; 3] = Default::default();
    for index in 1..=10u32 {
        let (slot, _) =
            agent.run(move |m| async move { m.create(index.into(), GuestLink::Tap).await })??;
        let links = world.ip_json(Some(&slot.namespace), &["link", "show", "eth0"])?;
        assert_eq!(
            links[0]["ifindex"],
            netagent_common::SLOT_ETH0_IFINDEX,
            "eth0 of slot {index}"
        );
        for (hook, (ns, dev)) in [
            (slot.namespace.as_str(), "tap0"),
            (slot.namespace.as_str(), "eth0"),
            (host.as_str(), slot.veth.as_str()),
        ]
        .into_iter()
        .enumerate()
        {
            let filters = filter_ids(ns, dev)?;
            assert_eq!(filters.len(), 1, "one program on {dev} of slot {index}");
            let (id, pref, handle) = &filters[0];
            // Priority and handle let a restarted agent find the filter again.
            assert_eq!(*pref, u64::from(netagent::bpf::FILTER_PRIORITY), "{dev}");
            assert_eq!(*handle, format!("{index:#x}"), "handle of {dev}");
            per_hook[hook].insert(*id);
        }
    }
    for (hook, ids) in ["tap0", "eth0", "host veth"].iter().zip(&per_hook) {
        assert_eq!(
            ids.len(),
            1,
            "all 10 slots run the same program on {hook}: {ids:?}"
        );
        assert!(
            ids.is_subset(&before),
            "the {hook} program was loaded before any slot existed: {ids:?}"
        );
    }
    agent.shutdown()?;
    Ok(())
}

fn rss_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        })
        .unwrap_or(0)
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    sorted[((sorted.len() as f64 - 1.0) * p).round() as usize]
}

/// Serial create and delete latency of 200 TAP slots (run with `--release
/// --ignored`; prints the figures).
#[test]
#[ignore = "a measurement: run with --release -- --ignored --nocapture"]
fn measure_serial_create_and_delete_latency() -> Result<()> {
    let Some(world) = World::new()? else {
        return Ok(());
    };
    let agent = world.start_agent(|_| {})?;
    const N: u32 = 200;
    let rss0 = rss_kib();
    let t0 = std::time::Instant::now();
    let mut create = Vec::new();
    for index in 1..=N {
        let t = std::time::Instant::now();
        agent.run(move |m| async move { m.create(index.into(), GuestLink::Tap).await })??;
        create.push(t.elapsed().as_secs_f64() * 1e3);
    }
    let total = t0.elapsed();
    let rss1 = rss_kib();
    let mut delete = Vec::new();
    for index in 1..=N {
        let t = std::time::Instant::now();
        agent.run(move |m| async move { m.delete(index.into()).await })??;
        delete.push(t.elapsed().as_secs_f64() * 1e3);
    }
    for (what, v) in [("create", &mut create), ("delete", &mut delete)] {
        v.sort_by(f64::total_cmp);
        eprintln!(
            "{what}: n {} p50 {:.2} ms p99 {:.2} ms max {:.2} ms",
            v.len(),
            percentile(v, 0.5),
            percentile(v, 0.99),
            v[v.len() - 1]
        );
    }
    eprintln!(
        "{N} serial creates in {:.2} s; process RSS +{} KiB ({:.1} KiB per slot)",
        total.as_secs_f64(),
        rss1.saturating_sub(rss0),
        rss1.saturating_sub(rss0) as f64 / f64::from(N)
    );
    agent.shutdown()?;
    Ok(())
}

/// A slot's namespace is alike whether it came from the agent's pool of ready
/// namespaces or was made by the create itself (`netns_pool = 0`): IPv6 off
/// for every link, `tap0` with the slot's ifindex, `lo` up. The pool's own
/// namespaces have no name, so nothing of them shows under /run/netns.
#[test]
fn pooled_and_unpooled_slot_namespaces_are_alike() -> Result<()> {
    let Some(world) = World::new()? else {
        return Ok(());
    };
    for (pool, index) in [(0usize, 1u32), (4, 2)] {
        let before = world.namespaces();
        let agent = world.start_agent(|c| c.netns_pool = pool)?;
        // Give the pool time to fill: its namespaces stay unnamed.
        std::thread::sleep(std::time::Duration::from_millis(200));
        assert_eq!(
            world.namespaces(),
            before,
            "pool {pool}: unnamed namespaces only"
        );
        let (slot, _) =
            agent.run(move |m| async move { m.create(index.into(), GuestLink::Tap).await })??;
        let sysctls = world.in_ns(&slot.namespace, || {
            ["all", "default", "lo", "eth0", "tap0"].map(|dev| {
                std::fs::read_to_string(format!("/proc/sys/net/ipv6/conf/{dev}/disable_ipv6"))
                    .map(|v| v.trim().to_string())
                    .unwrap_or_else(|e| format!("{dev}: {e}"))
            })
        })?;
        assert_eq!(sysctls, ["1"; 5].map(String::from), "pool {pool}");
        let tap = world.ip_json(Some(&slot.namespace), &["link", "show", "tap0"])?;
        assert_eq!(
            tap[0]["ifindex"],
            netagent_common::SLOT_TAP_IFINDEX_BASE + index,
            "pool {pool}"
        );
        let lo = world.ip_json(Some(&slot.namespace), &["link", "show", "lo"])?;
        assert!(
            lo[0]["flags"]
                .as_array()
                .is_some_and(|f| f.iter().any(|x| x == "UP")),
            "pool {pool}: lo up"
        );
        agent.run(move |m| async move { m.delete(index.into()).await })??;
        agent.shutdown()?;
    }
    Ok(())
}
