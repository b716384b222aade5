//! Churn against a real `netagent up` in a throwaway world: create/delete cycles
//! serial and concurrent (with traffic in some cycles), then zero leaks of every
//! kind `netagent_tests::leaks` sees and bounded RSS growth; a create racing a
//! delete of the same slot ends in one consistent state; create and delete are
//! idempotent.
//!
//! The CI form is small (about 2 minutes on 2 cores). `cargo xtask soak` runs the
//! ignored `soak` test here at full scale (`NETAGENT_SOAK_CYCLES`,
//! `NETAGENT_SOAK_CONCURRENCY`) and prints the figures.

use std::collections::BTreeSet;
use std::net::{Ipv4Addr, UdpSocket};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use netagent::api::client::Client;
use netagent::slot::GuestLink;
use netagent_tests::daemon::{Daemon, Netns, WAN_IP, spawn_in_netns, udp_echo};
use netagent_tests::leaks::{self, Leak, Snapshot, Strictness, Target};

/// RSS the agent may gain over the CI churn after its warm-up cycles, kB.
const CI_RSS_GROWTH_KB: u64 = 4 * 1024;
/// RSS the agent may gain over a soak after its warm-up cycles, kB.
const SOAK_RSS_GROWTH_KB: u64 = 8 * 1024;
/// How long leftover state may take to settle before it counts as a leak.
/// (Idle tokio blocking threads of the agent exit after 10 s.)
const SETTLE: Duration = Duration::from_secs(15);
/// Slot indices of the serial phase, the concurrent workers and the race.
const SERIAL_SLOT: i64 = 1;
const WORKER_BASE: i64 = 100;
const RACE_SLOT: i64 = 7;
/// UDP ports of the traffic (wan echo, host→guest echo), per worker.
const WAN_PORT_BASE: u16 = 21000;
const HOST_PORT_BASE: u16 = 22000;

/// How much churn.
#[derive(Debug, Clone, Copy)]
struct Scale {
    /// Serial create/delete cycles of one slot.
    serial: usize,
    /// Concurrent workers, each on its own slot.
    workers: usize,
    /// Cycles per worker.
    per_worker: usize,
    /// Every this many cycles a slot carries traffic (veth guest, UDP to the wan
    /// through masquerade and from the host to HostIP).
    traffic_every: usize,
    /// Workers that carry traffic (the others use TAP slots).
    traffic_workers: usize,
    /// RSS growth allowed after warm-up, kB.
    rss_growth_kb: u64,
    /// System-wide BPF ids count as leaks (only on a quiet machine).
    strict: Strictness,
}

impl Scale {
    fn ci() -> Scale {
        Scale {
            serial: 200,
            workers: 32,
            per_worker: 5,
            traffic_every: 10,
            traffic_workers: 4,
            rss_growth_kb: CI_RSS_GROWTH_KB,
            strict: Strictness::Instance,
        }
    }

    /// `NETAGENT_SOAK_CYCLES` (default 10000) create/delete cycles in all: half
    /// serially, half spread over `NETAGENT_SOAK_CONCURRENCY` (default 32) workers.
    fn soak() -> Result<Scale> {
        let num = |name: &str, default: usize| -> Result<usize> {
            match std::env::var(name) {
                Ok(v) => v.parse().with_context(|| format!("{name}={v}")),
                Err(_) => Ok(default),
            }
        };
        let cycles = num("NETAGENT_SOAK_CYCLES", 10_000)?;
        let workers = num("NETAGENT_SOAK_CONCURRENCY", 32)?.max(1);
        let strict = if std::env::var_os("NETAGENT_SOAK_STRICT_GLOBAL").is_some() {
            Strictness::Global
        } else {
            Strictness::Instance
        };
        Ok(Scale {
            serial: cycles / 2,
            workers,
            per_worker: (cycles - cycles / 2).div_ceil(workers),
            traffic_every: 10,
            traffic_workers: workers.min(4),
            rss_growth_kb: SOAK_RSS_GROWTH_KB,
            strict,
        })
    }
}

/// Latencies of the API calls.
#[derive(Debug, Default)]
struct Timings {
    create: Vec<Duration>,
    delete: Vec<Duration>,
}

fn percentile(v: &mut [Duration], p: f64) -> Duration {
    if v.is_empty() {
        return Duration::ZERO;
    }
    v.sort();
    let i = ((v.len() as f64 - 1.0) * p).round() as usize;
    v[i]
}

/// p50/p99 of create, then of delete, over the cycles in `range`.
fn latencies(
    tm: &mut Timings,
    range: impl std::slice::SliceIndex<[Duration], Output = [Duration]> + Clone,
) -> [Duration; 4] {
    let c = &mut tm.create[range.clone()];
    let (c50, c99) = (percentile(c, 0.5), percentile(c, 0.99));
    let d = &mut tm.delete[range];
    [c50, c99, percentile(d, 0.5), percentile(d, 0.99)]
}

/// The figures of one churn run.
#[derive(Debug)]
struct Report {
    cycles: usize,
    traffic_cycles: usize,
    elapsed: Duration,
    leaks: Vec<Leak>,
    notes: Vec<Leak>,
    rss_start_kb: u64,
    rss_warm_kb: u64,
    rss_serial_kb: u64,
    rss_conc_warm_kb: u64,
    rss_end_kb: u64,
    serial_elapsed: Duration,
    fds_start: usize,
    fds_end: usize,
    /// p50/p99 of create and delete, serial phase then concurrent phase.
    serial_lat: [Duration; 4],
    conc_lat: [Duration; 4],
    start: String,
    end: String,
}

impl Report {
    fn print(&self) {
        println!("churn: cycles run          {}", self.cycles);
        println!("churn: cycles with traffic {}", self.traffic_cycles);
        println!("churn: elapsed             {:.1?}", self.elapsed);
        println!("churn: leaks found         {}", self.leaks.len());
        for l in &self.leaks {
            println!("churn:   LEAK {l}");
        }
        for n in &self.notes {
            println!("churn:   note {n}");
        }
        println!("churn: serial phase        {:.1?}", self.serial_elapsed);
        println!(
            "churn: agent RSS kB        start {} | serial: after warm-up {} end {} (growth {}) | \
             concurrent: after warm-up {} end {} (growth {})",
            self.rss_start_kb,
            self.rss_warm_kb,
            self.rss_serial_kb,
            self.rss_serial_kb as i64 - self.rss_warm_kb as i64,
            self.rss_conc_warm_kb,
            self.rss_end_kb,
            self.rss_end_kb as i64 - self.rss_conc_warm_kb as i64
        );
        println!(
            "churn: agent fds           start {} end {}",
            self.fds_start, self.fds_end
        );
        for (phase, l) in [("serial", self.serial_lat), ("concurrent", self.conc_lat)] {
            println!(
                "churn: {phase:<10} create p50 {:.1?} p99 {:.1?}; delete p50 {:.1?} p99 {:.1?}",
                l[0], l[1], l[2], l[3]
            );
        }
        println!("churn: start {}", self.start);
        println!("churn: end   {}", self.end);
    }
}

fn rt() -> Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_multi_thread()
        .worker_threads(4)
        .enable_all()
        .build()?)
}

/// Sends `count` UDP datagrams from `client_ns` to `dst:port` and counts the
/// echoes of a server bound to 0.0.0.0:`port` in `server_ns` (host → HostIP →
/// guest, where the guest's own address differs from the one dialled).
fn udp_echo_via(
    client_ns: &str,
    server_ns: &str,
    dst: Ipv4Addr,
    port: u16,
    count: usize,
) -> Result<usize> {
    let (ready_tx, ready_rx) = std::sync::mpsc::channel();
    let server = spawn_in_netns(server_ns, move || {
        let sock = UdpSocket::bind(("0.0.0.0", port)).context("bind guest echo")?;
        sock.set_read_timeout(Some(Duration::from_secs(3)))?;
        let _ = ready_tx.send(());
        let mut buf = [0u8; 2048];
        for _ in 0..count {
            let Ok((n, from)) = sock.recv_from(&mut buf) else {
                break;
            };
            sock.send_to(&buf[..n], from)?;
        }
        Ok(())
    });
    ready_rx
        .recv_timeout(Duration::from_secs(5))
        .context("guest echo server did not start")?;
    let client = spawn_in_netns(client_ns, move || {
        let sock = UdpSocket::bind("0.0.0.0:0")?;
        sock.connect((dst, port))?;
        sock.set_read_timeout(Some(Duration::from_secs(2)))?;
        let mut back = 0;
        let mut buf = [0u8; 2048];
        for i in 0..count {
            let payload = [i as u8; 64];
            sock.send(&payload)?;
            if let Ok(n) = sock.recv(&mut buf)
                && buf[..n] == payload
            {
                back += 1;
            }
        }
        Ok(back)
    });
    let back = client
        .join()
        .map_err(|_| anyhow::anyhow!("client thread panicked"))??;
    let _ = server.join();
    Ok(back)
}

/// Traffic through a veth-guest slot: 3 UDP echoes guest → wan (masquerade) and 3
/// host → HostIP (DNAT to the guest). Fails unless every echo comes back.
fn traffic(
    host_ns: &str,
    wan_ns: &str,
    guest_ns: &str,
    host_ip: Ipv4Addr,
    worker: u16,
) -> Result<()> {
    let out = udp_echo(guest_ns, wan_ns, WAN_IP, WAN_PORT_BASE + worker, 3, 200)?;
    ensure!(out == 3, "{out} of 3 guest→wan echoes came back");
    let back = udp_echo_via(host_ns, guest_ns, host_ip, HOST_PORT_BASE + worker, 3)?;
    ensure!(back == 3, "{back} of 3 host→HostIP echoes came back");
    Ok(())
}

/// Prints cycles done and the agent's RSS and fds every 30 s until dropped (the
/// RSS curve of a soak).
struct Progress {
    stop: Arc<std::sync::atomic::AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Progress {
    fn start(done: Arc<std::sync::atomic::AtomicUsize>, pid: Option<u32>) -> Progress {
        use std::sync::atomic::Ordering::Relaxed;
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let flag = stop.clone();
        let thread = std::thread::spawn(move || {
            let t0 = Instant::now();
            let mut next = Duration::from_secs(30);
            while !flag.load(Relaxed) {
                std::thread::sleep(Duration::from_millis(200));
                if t0.elapsed() < next {
                    continue;
                }
                next += Duration::from_secs(30);
                let usage = pid.and_then(|p| leaks::proc_usage(p).ok());
                println!(
                    "churn: progress {:>6.0?} cycles {:>6} agent RSS {} kB fds {} threads {}",
                    t0.elapsed(),
                    done.load(Relaxed),
                    usage.as_ref().map_or(0, |u| u.rss_kb),
                    usage.as_ref().map_or(0, |u| u.fds),
                    usage.as_ref().map_or(0, |u| u.threads),
                );
            }
        });
        Progress {
            stop,
            thread: Some(thread),
        }
    }
}

impl Drop for Progress {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// What one worker (or the serial loop) needs.
#[derive(Clone)]
struct Cycler {
    client: Client,
    host_ns: String,
    wan_ns: String,
    timings: Arc<Mutex<Timings>>,
    /// Cycles completed, for the progress lines.
    done: Arc<std::sync::atomic::AtomicUsize>,
}

impl Cycler {
    /// One create/delete cycle of slot `index`, with traffic when `guest` is given.
    async fn cycle(&self, index: i64, guest: Option<&str>, worker: u16) -> Result<bool> {
        let link = match guest {
            Some(ns) => GuestLink::Veth {
                guest_netns: ns.to_string(),
            },
            None => GuestLink::Tap,
        };
        let t = Instant::now();
        let (view, created) = self
            .client
            .create_slot(index, &link)
            .await
            .with_context(|| format!("create slot {index}"))?;
        let create = t.elapsed();
        ensure!(created, "slot {index} existed before its create");
        let mut carried = false;
        if let Some(guest_ns) = guest {
            let (h, w, g) = (
                self.host_ns.clone(),
                self.wan_ns.clone(),
                guest_ns.to_string(),
            );
            let host_ip = view.addr.host_ip;
            tokio::task::spawn_blocking(move || traffic(&h, &w, &g, host_ip, worker))
                .await?
                .with_context(|| format!("traffic through slot {index}"))?;
            carried = true;
        }
        let t = Instant::now();
        self.client
            .delete_slot(index)
            .await
            .with_context(|| format!("delete slot {index}"))?;
        let delete = t.elapsed();
        let mut tm = self.timings.lock().unwrap();
        tm.create.push(create);
        tm.delete.push(delete);
        self.done.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        Ok(carried)
    }
}

/// The churn: `scale.serial` cycles of one slot, then `workers × per_worker`
/// cycles concurrently, then a settled leak check against the snapshot taken
/// before anything was created.
fn run_churn(d: &Daemon, scale: Scale) -> Result<Report> {
    let p = &d.world.prefix;
    let serial_guest = Netns::add(&format!("{p}-gs"))?;
    let worker_guests: Vec<Netns> = (0..scale.traffic_workers)
        .map(|w| Netns::add(&format!("{p}-gw{w}")))
        .collect::<Result<_>>()?;
    let mut target = Target::of(d).watch(&serial_guest.name);
    for g in &worker_guests {
        target = target.watch(&g.name);
    }
    let base = leaks::snapshot(&target);
    ensure!(base.errors.is_empty(), "baseline: {:?}", base.errors);
    println!("churn: baseline {}", base.summary());

    let rt = rt()?;
    let cycler = Cycler {
        client: d.client(),
        host_ns: d.world.host_ns.clone(),
        wan_ns: d.world.wan_ns.clone(),
        timings: Arc::new(Mutex::new(Timings::default())),
        done: Arc::new(std::sync::atomic::AtomicUsize::new(0)),
    };
    let started = Instant::now();
    let _progress = Progress::start(cycler.done.clone(), d.pid());
    let mut cycles = 0;
    let mut traffic_cycles = 0;
    // Warm-up: one cycle of each kind before the RSS reference.
    let warm = rt.block_on(async {
        cycler.cycle(SERIAL_SLOT, None, 0).await?;
        cycler.cycle(SERIAL_SLOT, Some(&serial_guest.name), 0).await
    })?;
    cycles += 2;
    traffic_cycles += usize::from(warm);
    let warm_snap = leaks::snapshot(&target);
    let rss_warm_kb = warm_snap.rss_kb().unwrap_or(0);

    // Serial.
    rt.block_on(async {
        for i in 0..scale.serial {
            let guest = (i % scale.traffic_every == 0).then_some(serial_guest.name.as_str());
            if cycler.cycle(SERIAL_SLOT, guest, 0).await? {
                traffic_cycles += 1;
            }
            cycles += 1;
        }
        anyhow::Ok(())
    })?;
    let serial_elapsed = started.elapsed();
    let serial_n = cycler.timings.lock().unwrap().create.len();
    let after_serial = leaks::snapshot(&target);
    println!(
        "churn: after serial ({serial_elapsed:.1?}) {}",
        after_serial.summary()
    );

    // Concurrent: one slot per worker, in two rounds: the first (a fifth of
    // the cycles) warms the agent up for concurrency (allocator arenas of its
    // worker threads), the RSS reference of the second.
    let guests: Vec<String> = worker_guests.iter().map(|g| g.name.clone()).collect();
    let warm_per = (scale.per_worker / 5).max(1).min(scale.per_worker);
    let (done1, carried1) = concurrent(&rt, &cycler, &guests, scale, 0, warm_per)?;
    let conc_warm = leaks::snapshot(&target);
    println!(
        "churn: after concurrent warm-up ({:.1?}) {}",
        started.elapsed(),
        conc_warm.summary()
    );
    let (done2, carried2) = concurrent(&rt, &cycler, &guests, scale, warm_per, scale.per_worker)?;
    let (done, carried) = (done1 + done2, carried1 + carried2);
    cycles += done;
    traffic_cycles += carried;
    let elapsed = started.elapsed();

    let (end, found) = leaks::settled_leaks(&target, &base, scale.strict, SETTLE);
    let notes = if scale.strict == Strictness::Instance {
        end.global_growth(&base)
    } else {
        Vec::new()
    };
    let mut tm = cycler.timings.lock().unwrap();
    let report = Report {
        cycles,
        traffic_cycles,
        elapsed,
        leaks: found,
        notes,
        rss_start_kb: base.rss_kb().unwrap_or(0),
        rss_warm_kb,
        rss_serial_kb: after_serial.rss_kb().unwrap_or(0),
        rss_conc_warm_kb: conc_warm.rss_kb().unwrap_or(0),
        serial_elapsed,
        rss_end_kb: end.rss_kb().unwrap_or(0),
        fds_start: base.fds().unwrap_or(0),
        fds_end: end.fds().unwrap_or(0),
        serial_lat: latencies(&mut tm, ..serial_n),
        conc_lat: latencies(&mut tm, serial_n..),
        start: base.summary(),
        end: end.summary(),
    };
    drop(tm);
    drop(worker_guests);
    drop(serial_guest);
    Ok(report)
}

/// Cycles `from..to` of every worker, all workers at once; (cycles, with traffic).
fn concurrent(
    rt: &tokio::runtime::Runtime,
    cycler: &Cycler,
    guests: &[String],
    scale: Scale,
    from: usize,
    to: usize,
) -> Result<(usize, usize)> {
    rt.block_on(async {
        let mut tasks = Vec::new();
        for w in 0..scale.workers {
            let c = cycler.clone();
            let guest = guests.get(w).cloned();
            let every = scale.traffic_every;
            tasks.push(tokio::spawn(async move {
                let (mut done, mut carried) = (0usize, 0usize);
                for i in from..to {
                    let g = guest.as_deref().filter(|_| i % every == 0);
                    if c.cycle(WORKER_BASE + w as i64, g, 1 + w as u16).await? {
                        carried += 1;
                    }
                    done += 1;
                }
                anyhow::Ok((done, carried))
            }));
        }
        let (mut done, mut carried) = (0, 0);
        for t in tasks {
            let (d, c) = t.await??;
            done += d;
            carried += c;
        }
        anyhow::Ok((done, carried))
    })
}

fn check(report: &Report, scale: Scale, d: &Daemon) -> Result<()> {
    report.print();
    leaks::ensure_no_leaks(&report.leaks).with_context(|| {
        format!(
            "after {} cycles; agent log tail:\n{}",
            report.cycles,
            tail(&d.logs(), 40)
        )
    })?;
    ensure!(
        report.rss_serial_kb <= report.rss_warm_kb + scale.rss_growth_kb,
        "agent RSS grew from {} kB (after warm-up) to {} kB over the serial cycles (bound +{} kB)",
        report.rss_warm_kb,
        report.rss_serial_kb,
        scale.rss_growth_kb
    );
    ensure!(
        report.rss_end_kb <= report.rss_conc_warm_kb + scale.rss_growth_kb,
        "agent RSS grew from {} kB (after the concurrent warm-up) to {} kB over the \
         concurrent cycles (bound +{} kB)",
        report.rss_conc_warm_kb,
        report.rss_end_kb,
        scale.rss_growth_kb
    );
    Ok(())
}

fn tail(text: &str, n: usize) -> String {
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

#[test]
fn churn_serial_and_concurrent_leaves_no_leaks() -> Result<()> {
    let Some(d) = Daemon::start("churn_serial_and_concurrent_leaves_no_leaks")? else {
        return Ok(());
    };
    let scale = Scale::ci();
    let report = run_churn(&d, scale)?;
    ensure!(
        report.cycles == 2 + scale.serial + scale.workers * scale.per_worker,
        "{} cycles ran",
        report.cycles
    );
    ensure!(report.traffic_cycles > 0);
    check(&report, scale, &d)
}

/// Full-scale churn for `cargo xtask soak`.
#[test]
#[ignore = "long: run with `cargo xtask soak`"]
fn soak() -> Result<()> {
    let Some(d) = Daemon::start("soak")? else {
        bail!("the soak needs root (CAP_NET_ADMIN, CAP_SYS_ADMIN, CAP_BPF)");
    };
    let scale = Scale::soak()?;
    let report = run_churn(&d, scale)?;
    check(&report, scale, &d)
}

/// What the kernel holds of slot `index`, seen from outside the agent.
#[derive(Debug)]
struct SlotPresence {
    api: bool,
    namespace: bool,
    veth: bool,
    slots_entry: bool,
    addr_entries: usize,
    veth_entries: usize,
    veth_hook: bool,
    guest_eth0: bool,
}

impl SlotPresence {
    fn all(&self) -> bool {
        self.api
            && self.namespace
            && self.veth
            && self.slots_entry
            && self.addr_entries == 2
            && self.veth_entries == 1
            && self.veth_hook
            && self.guest_eth0
    }

    fn none(&self) -> bool {
        !self.api
            && !self.namespace
            && !self.veth
            && !self.slots_entry
            && self.addr_entries == 0
            && self.veth_entries == 0
            && !self.veth_hook
            && !self.guest_eth0
    }
}

fn presence(d: &Daemon, target: &Target, guest_ns: &str, index: i64, api: bool) -> SlotPresence {
    let s: Snapshot = leaks::snapshot(target);
    let ns = format!("{}-ns-{index}", d.world.prefix);
    let veth = format!("{}-veth-{index}", d.world.prefix);
    SlotPresence {
        api,
        namespace: s.namespaces.contains(&ns),
        veth: s.host_links.contains(&veth),
        slots_entry: s.active_slots.contains(&(index as u32)),
        addr_entries: s.map_entries.get("ADDR_SLOTS").copied().unwrap_or(0),
        veth_entries: s.map_entries.get("VETH_SLOTS").copied().unwrap_or(0),
        veth_hook: s.attachments.contains_key(&format!("{veth}/ingress")),
        guest_eth0: s
            .watched_links
            .get(guest_ns)
            .is_some_and(|l| l.contains("eth0")),
    }
}

#[test]
fn create_racing_delete_of_one_slot_ends_consistent() -> Result<()> {
    let Some(d) = Daemon::start("create_racing_delete_of_one_slot_ends_consistent")? else {
        return Ok(());
    };
    let guest = Netns::add(&format!("{}-gr", d.world.prefix))?;
    let target = Target::of(&d).watch(&guest.name);
    let base = leaks::snapshot(&target);
    ensure!(base.errors.is_empty(), "baseline: {:?}", base.errors);
    let rt = rt()?;
    let c = d.client();
    let link = GuestLink::Veth {
        guest_netns: guest.name.clone(),
    };
    let (mut existed, mut gone) = (0, 0);
    for round in 0..40u64 {
        // One request starts 0..9 ms after the other (the delete in even rounds,
        // the create in odd ones): the delete lands before, during and after
        // the create's steps.
        let delay = Duration::from_millis((round / 2) % 10);
        let (create_delay, delete_delay) = if round % 2 == 0 {
            (Duration::ZERO, delay)
        } else {
            (delay, Duration::ZERO)
        };
        let body = serde_json::to_vec(&link)?;
        let (created, deleted) = rt.block_on(async {
            let (c1, c2) = (c.clone(), c.clone());
            let create = tokio::spawn(async move {
                tokio::time::sleep(create_delay).await;
                c1.request("PUT", &format!("/v1/slots/{RACE_SLOT}"), Some(&body))
                    .await
            });
            let delete = tokio::spawn(async move {
                tokio::time::sleep(delete_delay).await;
                c2.request("DELETE", &format!("/v1/slots/{RACE_SLOT}"), None)
                    .await
            });
            anyhow::Ok((create.await??, delete.await??))
        })?;
        ensure!(
            created.status == 201,
            "round {round}: create {} {}",
            created.status,
            created.text()
        );
        ensure!(
            deleted.status == 204 || deleted.status == 404,
            "round {round}: delete {} {}",
            deleted.status,
            deleted.text()
        );
        let api = rt.block_on(c.request("GET", &format!("/v1/slots/{RACE_SLOT}"), None))?;
        ensure!(
            api.status == 200 || api.status == 404,
            "round {round}: GET {}",
            api.status
        );
        let seen = presence(&d, &target, &guest.name, RACE_SLOT, api.status == 200);
        if api.status == 200 {
            ensure!(
                deleted.status == 404,
                "round {round}: delete said 204 but the slot exists: {seen:?}"
            );
            ensure!(seen.all(), "round {round}: slot half there: {seen:?}");
            // It works: traffic both ways.
            let view: netagent::controller::SlotView = api.json("slot")?;
            traffic(
                &d.world.host_ns,
                &d.world.wan_ns,
                &guest.name,
                view.addr.host_ip,
                0,
            )
            .with_context(|| format!("round {round}: the surviving slot carries no traffic"))?;
            rt.block_on(c.delete_slot(RACE_SLOT))?;
            existed += 1;
        } else {
            ensure!(seen.none(), "round {round}: slot half gone: {seen:?}");
            gone += 1;
        }
    }
    println!("race: slot survived {existed} rounds, was deleted in {gone}");
    let (_, found) = leaks::settled_leaks(&target, &base, Strictness::Instance, SETTLE);
    leaks::ensure_no_leaks(&found)
}

#[test]
fn create_and_delete_are_idempotent() -> Result<()> {
    let Some(d) = Daemon::start("create_and_delete_are_idempotent")? else {
        return Ok(());
    };
    let target = Target::of(&d);
    let base = leaks::snapshot(&target);
    ensure!(base.errors.is_empty(), "baseline: {:?}", base.errors);
    let rt = rt()?;
    let c = d.client();
    let (first, created) = rt.block_on(c.create_slot(3, &GuestLink::Tap))?;
    ensure!(created, "first create must create");
    let once = leaks::snapshot(&target);
    ensure!(
        once.active_slots == BTreeSet::from([3]),
        "{:?}",
        once.active_slots
    );
    for _ in 0..3 {
        let (again, created) = rt.block_on(c.create_slot(3, &GuestLink::Tap))?;
        ensure!(!created, "a repeated create must not create");
        ensure!(again == first, "{again:?} != {first:?}");
    }
    // Repeats changed nothing (the agent's fds, the kernel, the maps).
    let (_, grew) = leaks::settled_leaks(&target, &once, Strictness::Instance, SETTLE);
    leaks::ensure_no_leaks(&grew).context("repeated creates")?;
    let twice = leaks::snapshot(&target);
    ensure!(twice.host_links == once.host_links && twice.namespaces == once.namespaces);

    rt.block_on(c.delete_slot(3))?;
    for _ in 0..3 {
        let r = rt.block_on(c.request("DELETE", "/v1/slots/3", None))?;
        ensure!(
            r.status == 404,
            "repeated delete: {} {}",
            r.status,
            r.text()
        );
    }
    let (end, found) = leaks::settled_leaks(&target, &base, Strictness::Instance, SETTLE);
    leaks::ensure_no_leaks(&found).context("after delete")?;
    ensure!(end.active_slots.is_empty() && end.host_links == base.host_links);
    // And the slot can be made again.
    let (_, created) = rt.block_on(c.create_slot(3, &GuestLink::Tap))?;
    ensure!(created);
    rt.block_on(c.delete_slot(3))?;
    Ok(())
}

/// The detector itself: a slot left behind is named as every kind of leak it is.
#[test]
fn the_leak_check_names_what_a_slot_leaves() -> Result<()> {
    let Some(d) = Daemon::start("the_leak_check_names_what_a_slot_leaves")? else {
        return Ok(());
    };
    let target = Target::of(&d);
    let base = leaks::snapshot(&target);
    ensure!(base.errors.is_empty(), "baseline: {:?}", base.errors);
    let rt = rt()?;
    let c = d.client();
    rt.block_on(c.create_slot(5, &GuestLink::Tap))?;
    let found = leaks::snapshot(&target).leaks(&base, Strictness::Instance);
    let text: Vec<String> = found.iter().map(ToString::to_string).collect();
    let p = &d.world.prefix;
    for expected in [
        format!("namespace: {p}-ns-5"),
        format!("host link: {p}-veth-5"),
        "host address: ".to_string(),
        "host route: ".to_string(),
        format!("program attachment: {p}-veth-5/ingress"),
        "map entries: ADDR_SLOTS: 0 -> 2".to_string(),
        "map entries: VETH_SLOTS: 0 -> 1".to_string(),
        "SLOTS entry: slot 5 still active".to_string(),
        "metric: netagent_slots: 0 -> 1".to_string(),
        "metric: netagent_program_attachments".to_string(),
        // The slot namespace (its filters are removed there); no program or
        // link (the programs are shared, filters need no fd).
        "agent fd: net".to_string(),
    ] {
        ensure!(
            text.iter().any(|t| t.starts_with(&expected)),
            "no `{expected}` in {text:#?}"
        );
    }
    rt.block_on(c.delete_slot(5))?;
    let (_, found) = leaks::settled_leaks(&target, &base, Strictness::Instance, SETTLE);
    leaks::ensure_no_leaks(&found)
}
