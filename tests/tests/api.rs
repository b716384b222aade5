//! The API over a real Unix socket against a real `netagent up` in a throwaway
//! host namespace (see `netagent_tests::daemon`): every route, every error,
//! idempotency, 64 concurrent creates, metrics against stats, the socket and lock
//! rules, and shutdown.

use std::collections::{BTreeMap, BTreeSet};
use std::net::Ipv4Addr;
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::time::Duration;

use anyhow::{Context, Result, ensure};
use netagent::controller::SlotView;
use netagent::slot::{AddressPlan, GuestLink};
use netagent::stats::{SlotCounters, Traffic};
use netagent_common::DropReason;
use netagent_tests::daemon::{Daemon, DaemonOptions, Netns, WAN_IP, udp_echo, udp_send_fragmented};
use serde_json::Value;

/// method, path, body, expected status, expected part of the error message.
type BadRequest<'a> = (&'a str, &'a str, Option<&'a [u8]>, u16, &'a str);

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(4)
        .enable_all()
        .build()
        .unwrap()
}

fn plan(d: &Daemon) -> AddressPlan {
    AddressPlan::new(
        &d.world.prefix,
        Ipv4Addr::new(10, 11, 0, 0),
        Ipv4Addr::new(10, 12, 0, 0),
    )
    .unwrap()
}

fn error_of(body: &[u8]) -> String {
    serde_json::from_slice::<Value>(body)
        .ok()
        .and_then(|v| v.get("error").and_then(|e| e.as_str()).map(str::to_string))
        .unwrap_or_else(|| {
            format!(
                "<no JSON error field in {:?}>",
                String::from_utf8_lossy(body)
            )
        })
}

#[test]
fn every_route_and_every_error() -> Result<()> {
    let Some(d) = Daemon::start("every_route_and_every_error")? else {
        return Ok(());
    };
    let c = d.client();
    let plan = plan(&d);
    rt().block_on(async {
        // Health and an empty list.
        let r = c.request("GET", "/healthz", None).await?;
        ensure!(r.status == 200, "healthz: {}", r.text());
        let health: Value = r.json("health")?;
        ensure!(health["status"] == "ok" && health["programs_loaded"] == 4, "{health}");
        let r = c.request("GET", "/v1/slots", None).await?;
        ensure!(r.status == 200 && r.text() == "[]", "{} {}", r.status, r.text());

        // Create: 201 with exactly DESIGN §4's slot object (plus guest_link and
        // the security settings, none by default).
        let r = c.request("PUT", "/v1/slots/1", None).await?;
        ensure!(r.status == 201, "create: {} {}", r.status, r.text());
        ensure!(r.content_type.as_deref() == Some("application/json"));
        let slot: Value = r.json("slot")?;
        let p = &d.world.prefix;
        let want = serde_json::json!({"index":1,"namespace":format!("{p}-ns-1"),"veth":format!("{p}-veth-1"),
            "host_ip":"10.11.0.1","veth_ip":"10.12.0.2","vpeer_ip":"10.12.0.3","tap":"tap0",
            "tap_ip":"169.254.0.22","tap_mac":"02:fc:00:00:00:05","guest_ip":"169.254.0.21",
            "guest_netmask":"255.255.255.252","guest_link":"tap","guest_mac":null,
            "egress":{"allow":[],"deny":[]},"rate_limit":null});
        ensure!(slot == want, "slot JSON {slot} != {want}");
        ensure!(d.world.slot_namespaces() == vec![format!("{p}-ns-1")]);

        // Identical re-create: 200, same body, nothing new made.
        let r = c.request("PUT", "/v1/slots/1", Some(b"{}")).await?;
        ensure!(r.status == 200, "re-create: {} {}", r.status, r.text());
        ensure!(r.json::<Value>("slot")? == want);
        let r = c.request("PUT", "/v1/slots/1", Some(br#"{"guest_link":"tap"}"#)).await?;
        ensure!(r.status == 200, "re-create with explicit tap: {} {}", r.status, r.text());

        // A conflicting re-create (another guest link): 409, slot unchanged.
        let guest = Netns::add(&format!("{p}-g1"))?;
        let veth_body = format!(r#"{{"guest_link":"veth","guest_netns":"{}"}}"#, guest.name);
        let r = c.request("PUT", "/v1/slots/1", Some(veth_body.as_bytes())).await?;
        ensure!(r.status == 409, "conflict: {} {}", r.status, r.text());
        ensure!(error_of(&r.body).contains("slot 1"), "{}", r.text());
        ensure!(c.slot(1).await?.guest == GuestLink::Tap);

        // A veth slot into the guest namespace.
        let r = c.request("PUT", "/v1/slots/2", Some(veth_body.as_bytes())).await?;
        ensure!(r.status == 201, "veth create: {} {}", r.status, r.text());
        let v: SlotView = r.json("slot")?;
        ensure!(v.guest == GuestLink::Veth { guest_netns: guest.name.clone() }, "{v:?}");
        ensure!(v.addr == plan.slot(2).unwrap());
        let r = c.request("PUT", "/v1/slots/3", Some(br#"{"guest_link":"veth","guest_netns":"no-such-ns-x"}"#)).await?;
        ensure!(r.status == 400, "missing guest ns: {} {}", r.status, r.text());
        ensure!(error_of(&r.body).contains("no-such-ns-x"), "{}", r.text());

        // GET one, list, stats.
        let r = c.request("GET", "/v1/slots/1", None).await?;
        ensure!(r.status == 200 && r.json::<Value>("slot")? == want);
        let list: Vec<SlotView> = c.slots().await?;
        ensure!(list.iter().map(|s| s.addr.index).collect::<Vec<_>>() == vec![1, 2], "{list:?}");
        let r = c.request("GET", "/v1/slots/1/stats", None).await?;
        ensure!(r.status == 200, "stats: {}", r.text());
        let stats: Value = r.json("stats")?;
        for key in ["from_guest", "to_guest"] {
            ensure!(stats[key]["packets"].is_u64() && stats[key]["bytes"].is_u64(), "{stats}");
        }
        ensure!(stats["nat"]["allocations"].is_u64() && stats["nat"]["failures"].is_u64(), "{stats}");
        for reason in DropReason::ALL {
            ensure!(stats["drops"][reason.name()].is_u64(), "{} missing in {stats}", reason.name());
        }

        // /metrics is Prometheus text.
        let r = c.request("GET", "/metrics", None).await?;
        ensure!(r.status == 200, "metrics: {}", r.text());
        ensure!(r.content_type.as_deref().is_some_and(|t| t.starts_with("text/plain")), "{:?}", r.content_type);

        // Every bad request: a 4xx with {"error": ...} naming the problem.
        let big = vec![b' '; 64 * 1024];
        let cases: Vec<BadRequest> = vec![
            ("PUT", "/v1/slots/0", None, 400, "out of range"),
            ("PUT", "/v1/slots/32768", None, 400, "out of range"),
            ("PUT", "/v1/slots/-1", None, 400, "out of range"),
            ("PUT", "/v1/slots/abc", None, 400, "\"abc\" is not an integer"),
            ("GET", "/v1/slots/abc", None, 400, "not an integer"),
            ("DELETE", "/v1/slots/0", None, 400, "out of range"),
            ("GET", "/v1/slots/-1/stats", None, 400, "out of range"),
            ("GET", "/v1/slots/1024", None, 400, "max_slots"),
            ("PUT", "/v1/slots/5", Some(b"{not json"), 400, "not valid JSON"),
            ("PUT", "/v1/slots/5", Some(b"null"), 400, "invalid slot request"),
            ("PUT", "/v1/slots/5", Some(br#"{"guest_link":"tap","colour":1}"#), 400, "unknown field `colour`"),
            ("PUT", "/v1/slots/5", Some(br#"{"guest_link":"vhost"}"#), 400, "vhost"),
            ("PUT", "/v1/slots/5", Some(br#"{"guest_link":"veth"}"#), 400, "guest_netns"),
            ("PUT", "/v1/slots/5", Some(&big), 413, "too large"),
            ("POST", "/v1/slots", None, 405, "allowed: GET"),
            ("DELETE", "/v1/slots", None, 405, "not allowed"),
            ("POST", "/v1/slots/5", None, 405, "PUT"),
            ("PATCH", "/v1/slots/5", None, 405, "not allowed"),
            ("PUT", "/v1/slots/5/stats", None, 405, "not allowed"),
            ("POST", "/metrics", None, 405, "not allowed"),
            ("DELETE", "/healthz", None, 405, "not allowed"),
            ("GET", "/v1/slots/5", None, 404, "slot 5 does not exist"),
            ("DELETE", "/v1/slots/5", None, 404, "slot 5 does not exist"),
            ("GET", "/v1/slots/5/stats", None, 404, "slot 5 does not exist"),
            ("GET", "/", None, 404, "no such route"),
            ("GET", "/v1/slot/1", None, 404, "no such route"),
            ("GET", "/v1/slots/1/stats/extra", None, 404, "no such route"),
        ];
        for (method, path, body, want_status, needle) in cases {
            let r = c.request(method, path, body).await?;
            let err = error_of(&r.body);
            ensure!(r.status == want_status, "{method} {path}: got {} {err}", r.status);
            ensure!(r.content_type.as_deref() == Some("application/json"), "{method} {path}: {:?}", r.content_type);
            ensure!(err.contains(needle), "{method} {path}: {err:?} lacks {needle:?}");
            if want_status == 405 {
                ensure!(r.allow.is_some(), "{method} {path}: 405 without Allow");
            }
        }
        // None of them made or removed anything, and the daemon still serves.
        let after: Vec<u32> = c.slots().await?.iter().map(|s| s.addr.index).collect();
        ensure!(after == vec![1, 2], "{after:?}");
        ensure!(d.world.slot_namespaces().len() == 2, "{:?}", d.world.slot_namespaces());

        // Delete: 204 and gone; a second delete is 404.
        let r = c.request("DELETE", "/v1/slots/2", None).await?;
        ensure!(r.status == 204 && r.body.is_empty(), "delete: {} {}", r.status, r.text());
        let r = c.request("DELETE", "/v1/slots/2", None).await?;
        ensure!(r.status == 404, "second delete: {} {}", r.status, r.text());
        c.delete_slot(1).await?;
        ensure!(c.slots().await?.is_empty());
        ensure!(d.world.slot_namespaces().is_empty(), "{:?}", d.world.slot_namespaces());
        ensure!(d.world.host_links().iter().all(|l| !l.contains("-v")), "{:?}", d.world.host_links());
        drop(guest);
        Ok(())
    })
}

#[test]
fn sixty_four_concurrent_creates_of_distinct_slots() -> Result<()> {
    let Some(d) = Daemon::start("sixty_four_concurrent_creates_of_distinct_slots")? else {
        return Ok(());
    };
    let plan = plan(&d);
    // Spread over the index range, including carries into the third octet.
    let indices: Vec<i64> = (0..64).map(|i| 1 + i * 13).collect();
    rt().block_on(async {
        let t0 = std::time::Instant::now();
        let tasks: Vec<_> = indices
            .iter()
            .map(|&n| {
                let c = d.client();
                tokio::spawn(
                    async move { (n, c.request("PUT", &format!("/v1/slots/{n}"), None).await) },
                )
            })
            .collect();
        let mut seen_ips = BTreeSet::new();
        let mut seen_names = BTreeSet::new();
        for t in tasks {
            let (n, reply) = t.await?;
            let reply = reply?;
            ensure!(
                reply.status == 201,
                "slot {n}: {} {}",
                reply.status,
                reply.text()
            );
            let v: SlotView = reply.json("slot")?;
            ensure!(v.addr == plan.slot(n).unwrap(), "slot {n}: {v:?}");
            for ip in [v.addr.host_ip, v.addr.veth_ip, v.addr.vpeer_ip] {
                ensure!(seen_ips.insert(ip), "address {ip} given twice");
            }
            ensure!(
                seen_names.insert(v.addr.namespace.clone())
                    && seen_names.insert(v.addr.veth.clone())
            );
        }
        eprintln!("64 concurrent creates: {:?}", t0.elapsed());
        let c = d.client();
        let listed: Vec<i64> = c
            .slots()
            .await?
            .iter()
            .map(|s| i64::from(s.addr.index))
            .collect();
        ensure!(listed == indices, "{listed:?}");
        ensure!(d.world.slot_namespaces().len() == 64);

        // Concurrent identical re-creates: all 200.
        let again: Vec<_> = indices
            .iter()
            .map(|&n| {
                let c = d.client();
                tokio::spawn(async move { c.request("PUT", &format!("/v1/slots/{n}"), None).await })
            })
            .collect();
        for t in again {
            let r = t.await??;
            ensure!(r.status == 200, "{} {}", r.status, r.text());
        }

        // Concurrent deletes: all 204, nothing left.
        let t0 = std::time::Instant::now();
        let deletes: Vec<_> = indices
            .iter()
            .map(|&n| {
                let c = d.client();
                tokio::spawn(
                    async move { c.request("DELETE", &format!("/v1/slots/{n}"), None).await },
                )
            })
            .collect();
        for t in deletes {
            let r = t.await??;
            ensure!(r.status == 204, "{} {}", r.status, r.text());
        }
        eprintln!("64 concurrent deletes: {:?}", t0.elapsed());
        ensure!(c.slots().await?.is_empty());
        ensure!(
            d.world.slot_namespaces().is_empty(),
            "{:?}",
            d.world.slot_namespaces()
        );
        Ok(())
    })
}

#[test]
fn same_slot_requests_are_serialized() -> Result<()> {
    let Some(d) = Daemon::start("same_slot_requests_are_serialized")? else {
        return Ok(());
    };
    rt().block_on(async {
        // Eight racing creates of one slot: exactly one 201, the rest 200.
        let tasks: Vec<_> = (0..8)
            .map(|_| {
                let c = d.client();
                tokio::spawn(async move { c.request("PUT", "/v1/slots/7", None).await })
            })
            .collect();
        let mut statuses = Vec::new();
        for t in tasks {
            statuses.push(t.await??.status);
        }
        statuses.sort();
        ensure!(
            statuses == [200, 200, 200, 200, 200, 200, 200, 201],
            "{statuses:?}"
        );
        ensure!(d.world.slot_namespaces().len() == 1);
        Ok(())
    })
}

/// Parses `/metrics` with a Prometheus text parser; every sample line must parse.
fn parse_metrics(text: &str) -> Result<prometheus_parse::Scrape> {
    let scrape = prometheus_parse::Scrape::parse(text.lines().map(|l| Ok(l.to_string())))?;
    let sample_lines = text
        .lines()
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .count();
    ensure!(
        scrape.samples.len() == sample_lines,
        "parsed {} of {sample_lines} samples",
        scrape.samples.len()
    );
    Ok(scrape)
}

fn value(s: &prometheus_parse::Sample) -> f64 {
    match s.value {
        prometheus_parse::Value::Counter(v)
        | prometheus_parse::Value::Gauge(v)
        | prometheus_parse::Value::Untyped(v) => v,
        _ => f64::NAN,
    }
}

/// `metric{labels}` → value for one slot.
fn slot_series(scrape: &prometheus_parse::Scrape, slot: u32) -> BTreeMap<String, f64> {
    let slot = slot.to_string();
    scrape
        .samples
        .iter()
        .filter(|s| s.labels.get("slot") == Some(slot.as_str()))
        .map(|s| {
            let mut labels: Vec<String> = s
                .labels
                .iter()
                .filter(|(k, _)| k.as_str() != "slot")
                .map(|(k, v)| format!("{k}={v}"))
                .collect();
            labels.sort();
            (format!("{}{{{}}}", s.metric, labels.join(",")), value(s))
        })
        .collect()
}

fn expected_series(c: &SlotCounters) -> BTreeMap<String, f64> {
    let mut m = BTreeMap::new();
    for (dir, t) in [("from_guest", c.from_guest), ("to_guest", c.to_guest)] {
        m.insert(
            format!("netagent_slot_packets_total{{direction={dir}}}"),
            t.packets as f64,
        );
        m.insert(
            format!("netagent_slot_bytes_total{{direction={dir}}}"),
            t.bytes as f64,
        );
    }
    m.insert(
        "netagent_slot_nat_allocations_total{}".into(),
        c.nat.allocations as f64,
    );
    m.insert(
        "netagent_slot_nat_failures_total{}".into(),
        c.nat.failures as f64,
    );
    for (reason, n) in &c.drops {
        m.insert(
            format!("netagent_slot_drops_total{{reason={reason}}}"),
            *n as f64,
        );
    }
    m
}

#[test]
fn metrics_parse_and_match_slot_stats_after_traffic() -> Result<()> {
    let Some(d) = Daemon::start("metrics_parse_and_match_slot_stats_after_traffic")? else {
        return Ok(());
    };
    let guest = Netns::add(&format!("{}-g1", d.world.prefix))?;
    // A quiet guest: IPv6 off before its eth0 exists, so no router
    // solicitations (dropped and counted as `ipv6`) disturb the exact counts.
    let guest_fd = netagent::netlink::netns::open(&guest.name)?;
    for key in [
        "net.ipv6.conf.all.disable_ipv6",
        "net.ipv6.conf.default.disable_ipv6",
    ] {
        netagent::netlink::sysctl::write_in(std::os::fd::AsFd::as_fd(&guest_fd), key, "1")?;
    }
    let c = d.client();
    let rt = rt();
    rt.block_on(async {
        c.create_slot(
            3,
            &GuestLink::Veth {
                guest_netns: guest.name.clone(),
            },
        )
        .await?;
        c.create_slot(4, &GuestLink::Tap).await
    })?;

    // Guest → wan traffic through the datapath: 5 UDP datagrams of 100 bytes,
    // each echoed back by a server in the wan namespace.
    let back = udp_echo(&guest.name, &d.world.wan_ns, WAN_IP, 9000, 5, 100)?;
    if back != 5 {
        let stats = rt.block_on(c.stats(3));
        anyhow::bail!(
            "{back} of 5 echoes came back; slot 3 stats {stats:?}; agent log:\n{}",
            d.logs()
        );
    }

    rt.block_on(async {
        // Exactly the 5 datagrams each way, one flow, 100 bytes of payload + UDP,
        // IPv4 and Ethernet headers each (ARP and IPv6 are not counted).
        let stats = c.stats(3).await?;
        ensure!(
            stats.from_guest
                == Traffic {
                    packets: 5,
                    bytes: 5 * 142
                },
            "{stats:?}"
        );
        ensure!(
            stats.to_guest
                == Traffic {
                    packets: 5,
                    bytes: 5 * 142
                },
            "{stats:?}"
        );
        ensure!(
            stats.nat.allocations == 1 && stats.nat.failures == 0,
            "{stats:?}"
        );
        ensure!(stats.drops_total() == 0, "{stats:?}");

        let text = c.metrics().await?;
        let scrape = parse_metrics(&text)?;
        // Counters with no traffic since the stats read: the two must agree exactly.
        let stats = c.stats(3).await?;
        let got = slot_series(&scrape, 3);
        let want = expected_series(&stats);
        ensure!(got == want, "metrics of slot 3 {got:?}\n!= stats {want:?}");
        let idle = slot_series(&scrape, 4);
        ensure!(idle == expected_series(&c.stats(4).await?), "{idle:?}");
        ensure!(idle.values().all(|v| *v == 0.0), "{idle:?}");

        let global = |name: &str, label: Option<(&str, &str)>| -> Result<f64> {
            scrape
                .samples
                .iter()
                .find(|s| s.metric == name && label.is_none_or(|(k, v)| s.labels.get(k) == Some(v)))
                .map(value)
                .with_context(|| format!("{name} {label:?} missing"))
        };
        ensure!(global("netagent_slots", None)? == 2.0);
        ensure!(global("netagent_programs_loaded", None)? == 4.0);
        ensure!(global("netagent_program_attachments", None)? == 7.0);
        for table in ["nat_egress", "nat_ingress", "host_flows"] {
            let cap = global("netagent_table_capacity", Some(("table", table)))?;
            let used = global("netagent_table_entries", Some(("table", table)))?;
            ensure!(cap > 0.0 && used <= cap, "{table}: {used}/{cap}");
        }
        ensure!(global("netagent_table_capacity", Some(("table", "nat_egress")))? == 4096.0);
        ensure!(
            global("netagent_table_entries", Some(("table", "nat_egress")))? >= 1.0,
            "ping flow not in NAT table"
        );
        for reason in DropReason::ALL {
            ensure!(
                scrape
                    .samples
                    .iter()
                    .any(|s| s.metric == "netagent_slot_drops_total"
                        && s.labels.get("reason") == Some(reason.name())),
                "drop reason {} missing",
                reason.name()
            );
        }

        // A datagram the kernel fragments: 3000 bytes of payload leave the guest
        // as three IPv4 fragments (MTU 1500), which the datapath drops and counts
        // by reason; stats and metrics agree on it.
        udp_send_fragmented(&guest.name, &format!("{WAN_IP}:9003"), 3000)?;
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        let stats = loop {
            let stats = c.stats(3).await?;
            if stats.drops_total() >= 3 || std::time::Instant::now() > deadline {
                break stats;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        };
        ensure!(
            stats.drops["fragment"] == 3 && stats.drops_total() == 3,
            "{stats:?}"
        );
        let scrape = parse_metrics(&c.metrics().await?)?;
        ensure!(
            slot_series(&scrape, 3) == expected_series(&stats),
            "metrics and stats disagree after drops"
        );
        ensure!(
            slot_series(&scrape, 3)["netagent_slot_drops_total{reason=fragment}"] == 3.0,
            "{:?}",
            slot_series(&scrape, 3)
        );

        // Counters are monotonic: more traffic only adds.
        let before = c.stats(3).await?;
        let back = udp_echo(&guest.name, &d.world.wan_ns, WAN_IP, 9001, 2, 100)?;
        ensure!(back == 2);
        let after = c.stats(3).await?;
        ensure!(
            after.from_guest.packets >= before.from_guest.packets + 2,
            "{before:?} -> {after:?}"
        );
        ensure!(after.to_guest.bytes > before.to_guest.bytes);
        Ok(())
    })
}

#[test]
fn socket_is_private_and_instances_exclude_each_other() -> Result<()> {
    let Some(mut d) = Daemon::start("socket_is_private_and_instances_exclude_each_other")? else {
        return Ok(());
    };
    let socket = d.world.socket();
    let meta = std::fs::symlink_metadata(&socket)?;
    ensure!(meta.file_type().is_socket());
    ensure!(
        meta.permissions().mode() & 0o777 == 0o600,
        "mode {:o}",
        meta.permissions().mode()
    );
    // --bpffs's parent was not a bpffs: the agent mounted one there.
    ensure!(
        netagent::daemon::is_bpffs(&d.world.dir.join("bpf")),
        "no bpffs at the parent of --bpffs"
    );
    ensure!(d.logs().contains("mounted a bpffs"), "{}", d.logs());

    // Same prefix, another socket: refused by the prefix lock.
    let mut args = d.up_args();
    let sock_at = args.iter().position(|a| a == "--socket").unwrap() + 1;
    args[sock_at] = d.world.dir.join("other.sock").display().to_string();
    let log = d.world.dir.join("second.log");
    let status = d.spawn_in_host(&args, &log)?.wait()?;
    let text = std::fs::read_to_string(&log)?;
    ensure!(
        !status.success(),
        "a second instance of the prefix started:\n{text}"
    );
    ensure!(
        text.contains("another netagent instance is running with prefix"),
        "{text}"
    );
    ensure!(
        text.contains(&format!("pid {}", d.pid().unwrap())),
        "{text}"
    );
    ensure!(!d.world.dir.join("other.sock").exists());

    // Another prefix, the same socket: refused because the socket answers.
    let mut args = d.up_args();
    let prefix_at = args.iter().position(|a| a == "--prefix").unwrap() + 1;
    let other_prefix = format!("{}x", d.world.prefix);
    args[prefix_at] = other_prefix.clone();
    let log = d.world.dir.join("third.log");
    let status = d.spawn_in_host(&args, &log)?.wait()?;
    let _ = std::fs::remove_file(format!("/run/netagent/{other_prefix}.lock"));
    let text = std::fs::read_to_string(&log)?;
    ensure!(
        !status.success(),
        "a second instance on the socket started:\n{text}"
    );
    ensure!(text.contains("already serving on"), "{text}");
    // The first instance is unharmed.
    let rt = rt();
    rt.block_on(d.client().create_slot(9, &GuestLink::Tap))?;

    // A crash leaves the socket file and the slot behind; the next start
    // replaces the stale socket and adopts the intact slot (tests/restart.rs
    // covers adoption and the removal of broken slots).
    d.stop_with(nix::sys::signal::Signal::SIGKILL)?;
    ensure!(socket.exists(), "socket vanished with SIGKILL");
    ensure!(d.world.slot_namespaces().len() == 1);
    d.launch(&[])?;
    ensure!(d.logs().contains("stale"), "{}", d.logs());
    let slots = rt.block_on(d.client().slots())?;
    ensure!(slots.len() == 1 && slots[0].addr.index == 9, "{slots:?}");
    ensure!(d.world.slot_namespaces().len() == 1);
    let (_, created) = rt.block_on(d.client().create_slot(9, &GuestLink::Tap))?;
    ensure!(!created, "slot 9 was made anew");
    Ok(())
}

#[test]
fn sigterm_deletes_every_slot_and_removes_the_socket() -> Result<()> {
    let Some(mut d) = Daemon::start("sigterm_deletes_every_slot_and_removes_the_socket")? else {
        return Ok(());
    };
    let rt = rt();
    rt.block_on(async {
        for n in [1, 2, 300] {
            d.client().create_slot(n, &GuestLink::Tap).await?;
        }
        anyhow::Ok(())
    })?;
    ensure!(d.world.slot_namespaces().len() == 3);
    ensure!(
        d.world.host_links().len() == 3,
        "{:?}",
        d.world.host_links()
    );
    let status = d.stop()?;
    ensure!(status.success(), "exit {status}:\n{}", d.logs());
    ensure!(
        d.world.slot_namespaces().is_empty(),
        "{:?}",
        d.world.slot_namespaces()
    );
    ensure!(
        d.world.host_links().is_empty(),
        "{:?}",
        d.world.host_links()
    );
    ensure!(!d.world.socket().exists(), "socket left behind");
    let logs = d.logs();
    ensure!(
        logs.contains("deleting every slot") && logs.contains("stopped cleanly"),
        "{logs}"
    );
    // JSON logs: every line is a JSON object.
    for line in logs.lines().filter(|l| !l.trim().is_empty()) {
        serde_json::from_str::<Value>(line).with_context(|| format!("not JSON: {line}"))?;
    }
    // The CLI now says the daemon is not running, in one line naming the socket.
    let socket = d.world.socket().display().to_string();
    let out = d.cli(&["slot", "list", "--socket", &socket])?;
    let err = String::from_utf8_lossy(&out.stderr);
    ensure!(!out.status.success() && err.lines().count() == 1, "{err}");
    ensure!(
        err.contains("not running") && err.contains(&socket),
        "{err}"
    );
    std::thread::sleep(Duration::from_millis(10));
    Ok(())
}

#[test]
fn reaper_expires_idle_flows_with_the_default_uplink() -> Result<()> {
    // No --uplink: the agent takes the default route's interface (up0). The
    // short timeouts come from a config file (and a flag overrides one of its keys).
    let config = std::env::temp_dir().join(format!("netagent-reaper-{}.toml", std::process::id()));
    std::fs::write(&config, "[timeouts]\nudp = 1\nreap_interval = 30\n")?;
    let opts = DaemonOptions {
        args: [
            "--config",
            config.to_str().unwrap(),
            "--timeouts-reap-interval",
            "1",
        ]
        .map(String::from)
        .to_vec(),
        default_uplink: true,
    };
    let started = Daemon::start_with("reaper_expires_idle_flows_with_the_default_uplink", opts);
    let _ = std::fs::remove_file(&config);
    let Some(mut d) = started? else {
        return Ok(());
    };
    ensure!(d.logs().contains("\"uplink\":\"up0\""), "{}", d.logs());
    let guest = Netns::add(&format!("{}-g1", d.world.prefix))?;
    let c = d.client();
    let rt = rt();
    rt.block_on(c.create_slot(
        1,
        &GuestLink::Veth {
            guest_netns: guest.name.clone(),
        },
    ))?;
    let back = udp_echo(&guest.name, &d.world.wan_ns, WAN_IP, 9002, 3, 64)?;
    ensure!(back == 3, "{back} of 3 echoes; log:\n{}", d.logs());
    let entries = |text: &str| -> Result<(f64, f64)> {
        let scrape = parse_metrics(text)?;
        let find = |name: &str, table: Option<&str>| {
            scrape
                .samples
                .iter()
                .find(|s| {
                    s.metric == name && table.is_none_or(|t| s.labels.get("table") == Some(t))
                })
                .map(value)
                .unwrap_or(f64::NAN)
        };
        Ok((
            find("netagent_table_entries", Some("nat_egress")),
            find("netagent_reaped_flows_total", None),
        ))
    };
    let (used, reaped_before) = entries(&rt.block_on(c.metrics())?)?;
    ensure!(
        used == 1.0,
        "nat_egress entries {used} right after the flow"
    );
    // Idle for longer than the 1 s UDP timeout plus a reaper period or two.
    let deadline = std::time::Instant::now() + Duration::from_secs(15);
    loop {
        std::thread::sleep(Duration::from_millis(500));
        let (used, reaped) = entries(&rt.block_on(c.metrics())?)?;
        if used == 0.0 {
            ensure!(
                reaped >= reaped_before + 1.0,
                "entries gone but reaped_flows_total {reaped_before} -> {reaped}"
            );
            break;
        }
        ensure!(
            std::time::Instant::now() < deadline,
            "the idle UDP flow was never reaped; log:\n{}",
            d.logs()
        );
    }
    // Counters survive the reaping of flows.
    ensure!(rt.block_on(c.stats(1))?.from_guest.packets == 3);

    // SIGINT stops the agent as cleanly as SIGTERM.
    let status = d.stop_with(nix::sys::signal::Signal::SIGINT)?;
    ensure!(status.success(), "exit {status}:\n{}", d.logs());
    ensure!(d.logs().contains("\"signal\":\"SIGINT\""), "{}", d.logs());
    ensure!(
        d.world.slot_namespaces().is_empty(),
        "{:?}",
        d.world.slot_namespaces()
    );
    Ok(())
}

#[test]
fn garbage_on_the_socket_never_hurts_the_daemon() -> Result<()> {
    use std::io::{Read, Write};
    use std::os::unix::net::UnixStream;
    let Some(d) = Daemon::start("garbage_on_the_socket_never_hurts_the_daemon")? else {
        return Ok(());
    };
    let socket = d.world.socket();
    let exchange = |bytes: &[u8]| -> Result<String> {
        let mut s = UnixStream::connect(&socket)?;
        s.set_read_timeout(Some(Duration::from_secs(15)))?;
        // The peer may close before reading everything: that is an answer too.
        let _ = s.write_all(bytes);
        let _ = s.shutdown(std::net::Shutdown::Write);
        let mut out = Vec::new();
        let _ = s.read_to_end(&mut out);
        Ok(String::from_utf8_lossy(&out).into_owned())
    };
    let long_header = format!(
        "GET /healthz HTTP/1.1\r\nHost: x\r\nX-Big: {}\r\n\r\n",
        "a".repeat(1 << 20)
    );
    let inputs: Vec<Vec<u8>> = vec![
        b"GARBAGE\r\n\r\n".to_vec(),
        b"\x00\x01\x02\xff\xfe".to_vec(),
        b"GET /v1/slots/1".to_vec(),
        b"PUT /v1/slots/\xff\xfe HTTP/1.1\r\nHost: x\r\n\r\n".to_vec(),
        b"PUT /v1/slots/1 HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n{\"guest".to_vec(),
        b"PUT /v1/slots/1 HTTP/1.1\r\nHost: x\r\nContent-Length: 99999999999\r\n\r\n".to_vec(),
        b"PUT /v1/slots/1 HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n".to_vec(),
        b"GET /../../etc/passwd HTTP/1.1\r\nHost: x\r\n\r\n".to_vec(),
        b"GET /v1/slots/%00 HTTP/1.1\r\nHost: x\r\n\r\n".to_vec(),
        b"PUT /v1/slots/2 HTTP/1.1\r\nHost: x\r\nContent-Length: 4\r\n\r\n\xff\xfe\xfd\xfc"
            .to_vec(),
        long_header.into_bytes(),
    ];
    for input in &inputs {
        let answer = exchange(input)?;
        // Any answer is a 4xx (or nothing at all), never a success or a 5xx.
        if let Some(status) = answer.strip_prefix("HTTP/1.1 ").and_then(|r| r.get(..3)) {
            ensure!(
                status.starts_with('4'),
                "{:?} -> {answer}",
                String::from_utf8_lossy(&input[..input.len().min(80)])
            );
        }
    }
    // Still serving, nothing made.
    let rt = rt();
    let r = rt.block_on(d.client().request("GET", "/healthz", None))?;
    ensure!(r.status == 200, "{}", r.text());
    ensure!(rt.block_on(d.client().slots())?.is_empty());
    ensure!(d.world.slot_namespaces().is_empty());
    Ok(())
}

#[test]
fn a_client_that_hangs_up_mid_request_leaves_no_half_made_slot() -> Result<()> {
    use std::io::Write;
    use std::os::unix::net::UnixStream;
    let Some(d) = Daemon::start("a_client_that_hangs_up_mid_request_leaves_no_half_made_slot")?
    else {
        return Ok(());
    };
    let socket = d.world.socket();
    // Sends a request and hangs up after `after`: before, during or after the work.
    let hang_up = |method: &str, after: Duration| -> Result<()> {
        let mut s = UnixStream::connect(&socket)?;
        write!(
            s,
            "{method} /v1/slots/5 HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n"
        )?;
        std::thread::sleep(after);
        drop(s);
        Ok(())
    };
    let rt = rt();
    let c = d.client();
    // Whatever happened, it happened completely: the slot is listed if and only
    // if its namespace and host veth exist.
    let consistent = || -> Result<bool> {
        std::thread::sleep(Duration::from_millis(500));
        let present = rt.block_on(c.request("GET", "/v1/slots/5", None))?.status == 200;
        let namespaces = d.world.slot_namespaces().len();
        let links = d.world.host_links().len();
        ensure!(
            (present && namespaces == 1 && links == 1)
                || (!present && namespaces == 0 && links == 0),
            "half-made: listed {present}, namespaces {namespaces}, host links {links}; log:\n{}",
            d.logs()
        );
        Ok(present)
    };
    for ms in [0, 2, 5, 10, 20, 40, 80] {
        let after = Duration::from_millis(ms);
        hang_up("PUT", after)?;
        if !consistent()? {
            rt.block_on(c.create_slot(5, &GuestLink::Tap))?;
        }
        hang_up("DELETE", after)?;
        if consistent()? {
            rt.block_on(c.delete_slot(5))?;
        }
        ensure!(!consistent()?);
    }
    Ok(())
}

#[test]
fn a_silent_or_slow_client_is_cut_off_and_others_are_served() -> Result<()> {
    use std::io::{Read, Write};
    use std::os::unix::net::UnixStream;
    let Some(d) = Daemon::start("a_silent_or_slow_client_is_cut_off_and_others_are_served")? else {
        return Ok(());
    };
    let socket = d.world.socket();
    // One client says nothing, another sends half a request line and stalls.
    let mut silent = UnixStream::connect(&socket)?;
    let mut slow = UnixStream::connect(&socket)?;
    slow.write_all(b"GET /healthz HTTP/1.1\r\nHo")?;
    let started = std::time::Instant::now();
    // Others are served meanwhile.
    let rt = rt();
    for _ in 0..3 {
        let r = rt.block_on(d.client().request("GET", "/healthz", None))?;
        ensure!(r.status == 200);
    }
    // Both are disconnected once the header read timeout (10 s) passes.
    for (name, s) in [("silent", &mut silent), ("slow", &mut slow)] {
        s.set_read_timeout(Some(Duration::from_secs(20)))?;
        let mut buf = Vec::new();
        let n = s.read_to_end(&mut buf);
        ensure!(n.is_ok(), "{name}: the server never hung up ({n:?})");
        let waited = started.elapsed();
        ensure!(
            waited >= Duration::from_secs(9) && waited < Duration::from_secs(20),
            "{name}: cut off after {waited:?}"
        );
    }
    Ok(())
}

/// Listening TCP sockets in the agent's namespace (`ss -Hltn`), local addresses.
fn tcp_listeners(d: &Daemon) -> Result<Vec<String>> {
    let out = netagent_tests::daemon::in_netns(&d.world.host_ns, "ss", &["-Hltn"])?;
    ensure!(out.status.success(), "ss: {:?}", out);
    Ok(String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.split_whitespace().nth(3).map(str::to_string))
        .collect())
}

/// One HTTP/1.1 request over TCP from inside the agent's namespace.
fn tcp_request(d: &Daemon, addr: &str, request: &'static str) -> Result<String> {
    use std::io::{Read, Write};
    let addr = addr.to_string();
    netagent_tests::daemon::spawn_in_netns(&d.world.host_ns, move || {
        let mut s = std::net::TcpStream::connect(&addr)?;
        s.set_read_timeout(Some(Duration::from_secs(10)))?;
        s.write_all(request.as_bytes())?;
        let mut out = String::new();
        s.read_to_string(&mut out)?;
        Ok(out)
    })
    .join()
    .map_err(|_| anyhow::anyhow!("client thread panicked"))?
}

/// `netagent slot list` as uid/gid 65534 (nobody), with supplementary `group` or none.
fn as_nobody(socket: &str, group: Option<&str>) -> Result<std::process::Output> {
    let bin = netagent_tests::daemon::netagent_bin()?;
    let mut cmd = std::process::Command::new("setpriv");
    cmd.args(["--reuid=65534", "--regid=65534"]);
    match group {
        Some(g) => cmd.arg(format!("--groups={g}")),
        None => cmd.arg("--clear-groups"),
    };
    cmd.arg(bin)
        .args(["slot", "list", "--socket", socket])
        .env_remove("NETAGENT_SOCKET")
        .output()
        .context("setpriv")
}

#[test]
fn no_tcp_and_a_root_only_socket_unless_configured() -> Result<()> {
    use std::os::unix::fs::MetadataExt;
    let Some(mut d) = Daemon::start("no_tcp_and_a_root_only_socket_unless_configured")? else {
        return Ok(());
    };
    // Defaults: no TCP listener at all, socket 0600 root:root.
    ensure!(tcp_listeners(&d)?.is_empty(), "{:?}", tcp_listeners(&d)?);
    let meta = std::fs::metadata(d.world.socket())?;
    ensure!(meta.permissions().mode() & 0o777 == 0o600 && meta.uid() == 0 && meta.gid() == 0);
    ensure!(d.logs().contains("\"api_tcp\":\"off\""), "{}", d.logs());
    let socket = d.world.socket().display().to_string();
    let out = as_nobody(&socket, Some("1"))?;
    ensure!(
        !out.status.success() && String::from_utf8_lossy(&out.stderr).contains("permission denied"),
        "{out:?}"
    );

    // Configured: 0660 owned by the group, and the API on the loopback address only.
    d.stop()?;
    let group = nix::unistd::Group::from_gid(nix::unistd::Gid::from_raw(1))?
        .context("group 1 does not exist")?;
    d.launch(&[
        "--socket-group".into(),
        group.name.clone(),
        "--api-tcp".into(),
        "127.0.0.1:7071".into(),
    ])?;
    let meta = std::fs::metadata(d.world.socket())?;
    ensure!(
        meta.permissions().mode() & 0o777 == 0o660 && meta.uid() == 0 && meta.gid() == 1,
        "mode {:o} owner {}:{}",
        meta.permissions().mode(),
        meta.uid(),
        meta.gid()
    );
    // A member of the group may use the API, others may not.
    let out = as_nobody(&socket, Some("1"))?;
    ensure!(out.status.success(), "{out:?}");
    let out = as_nobody(&socket, None)?;
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    ensure!(
        !out.status.success() && err.contains("permission denied") && err.lines().count() == 1,
        "{err}"
    );
    ensure!(
        tcp_listeners(&d)? == vec!["127.0.0.1:7071".to_string()],
        "{:?}",
        tcp_listeners(&d)?
    );
    let reply = tcp_request(
        &d,
        "127.0.0.1:7071",
        "GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
    )?;
    ensure!(reply.starts_with("HTTP/1.1 200"), "{reply}");
    ensure!(reply.contains("\"status\":\"ok\""), "{reply}");
    // The same API: a slot made over TCP is listed on the socket.
    let reply = tcp_request(
        &d,
        "127.0.0.1:7071",
        "PUT /v1/slots/4 HTTP/1.1\r\nHost: x\r\nConnection: close\r\nContent-Length: 0\r\n\r\n",
    )?;
    ensure!(reply.starts_with("HTTP/1.1 201"), "{reply}");
    let slots = rt().block_on(d.client().slots())?;
    ensure!(slots.len() == 1 && slots[0].addr.index == 4, "{slots:?}");
    // Stopping closes the TCP listener too.
    d.stop()?;
    ensure!(tcp_listeners(&d)?.is_empty());
    Ok(())
}

#[test]
fn request_size_and_time_limits_come_from_the_config() -> Result<()> {
    use std::io::{Read, Write};
    use std::os::unix::net::UnixStream;
    let opts = DaemonOptions {
        args: [
            "--api-body-limit",
            "1024",
            "--api-header-timeout",
            "1",
            "--api-request-timeout",
            "2",
        ]
        .map(String::from)
        .to_vec(),
        default_uplink: false,
    };
    let Some(d) = Daemon::start_with("request_size_and_time_limits_come_from_the_config", opts)?
    else {
        return Ok(());
    };
    let c = d.client();
    let rt = rt();
    // Size: 1 KiB is the limit now (the default is 16 KiB).
    let big = format!("{{\"guest_netns\":\"{}\"}}", "x".repeat(1100));
    let r = rt.block_on(c.request("PUT", "/v1/slots/1", Some(big.as_bytes())))?;
    ensure!(r.status == 413, "{} {}", r.status, r.text());
    ensure!(
        error_of(&r.body).contains("at most 1024 bytes"),
        "{}",
        r.text()
    );
    let small = format!(
        "{{\"guest_link\":\"veth\",\"guest_netns\":\"{}\"}}",
        "y".repeat(200)
    );
    let r = rt.block_on(c.request("PUT", "/v1/slots/1", Some(small.as_bytes())))?;
    ensure!(
        r.status == 400 && error_of(&r.body).contains("yyyy"),
        "under the limit the request is read and judged: {} {}",
        r.status,
        r.text()
    );

    // Headers: a silent client is cut off after 1 s (not the default 10 s).
    let socket = d.world.socket();
    let mut silent = UnixStream::connect(&socket)?;
    silent.set_read_timeout(Some(Duration::from_secs(10)))?;
    let started = std::time::Instant::now();
    let mut buf = Vec::new();
    ensure!(silent.read_to_end(&mut buf).is_ok(), "never hung up");
    let waited = started.elapsed();
    ensure!(
        waited >= Duration::from_millis(900) && waited < Duration::from_secs(4),
        "cut off after {waited:?}"
    );

    // Whole request: a body that never completes gets a 503 after 2 s.
    let mut slow = UnixStream::connect(&socket)?;
    slow.set_read_timeout(Some(Duration::from_secs(10)))?;
    let started = std::time::Instant::now();
    slow.write_all(
        b"PUT /v1/slots/2 HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n{",
    )?;
    let mut reply = vec![0u8; 4096];
    // Signals of other tests' children may interrupt the read: retry.
    let n = loop {
        match slow.read(&mut reply) {
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            other => break other?,
        }
    };
    let waited = started.elapsed();
    let reply = String::from_utf8_lossy(&reply[..n]).into_owned();
    ensure!(reply.starts_with("HTTP/1.1 503"), "{reply}");
    ensure!(reply.contains("api.request_timeout"), "{reply}");
    ensure!(
        waited >= Duration::from_millis(1900) && waited < Duration::from_secs(5),
        "answered after {waited:?}"
    );
    // Nothing was created, and the agent serves on.
    ensure!(rt.block_on(c.slots())?.is_empty());
    ensure!(rt.block_on(c.create_slot(3, &GuestLink::Tap))?.1);
    Ok(())
}
