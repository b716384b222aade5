//! The in-tree benchmark tools, run inside namespaces as `xtask bench <tool>`:
//! a connect / 1 request / close loop (client and server) and a small-packet UDP
//! blaster and sink. Each prints one `key=value …` line on stdout.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

use super::proc::{ns_cmd, run_bounded};

/// Request and response size of the connection-rate test.
const CRR_MSG: usize = 32;

#[derive(clap::Subcommand, Debug)]
pub enum Tool {
    /// Accepts connections; for each reads one request, answers, closes.
    #[command(hide = true)]
    CrrServer {
        #[arg(long)]
        listen: SocketAddr,
    },
    /// Connect, send one request, read the answer, close; repeated for `seconds`
    /// (or `count` times).
    #[command(hide = true)]
    CrrClient {
        #[arg(long)]
        connect: SocketAddr,
        #[arg(long, default_value_t = 0.0)]
        seconds: f64,
        #[arg(long, default_value_t = 0)]
        count: u64,
    },
    /// Counts UDP datagrams; reports the rate between the first and the last one.
    #[command(hide = true)]
    UdpSink {
        #[arg(long)]
        listen: SocketAddr,
        /// Give up after this long in total.
        #[arg(long)]
        seconds: f64,
    },
    /// Sends `size`-byte UDP datagrams as fast as it can for `seconds`.
    #[command(hide = true)]
    UdpBlast {
        #[arg(long)]
        connect: SocketAddr,
        #[arg(long)]
        seconds: f64,
        #[arg(long, default_value_t = 18)]
        size: usize,
    },
}

pub fn run(tool: &Tool) -> Result<()> {
    match tool {
        Tool::CrrServer { listen } => crr_server(*listen),
        Tool::CrrClient {
            connect,
            seconds,
            count,
        } => crr_client(*connect, *seconds, *count),
        Tool::UdpSink { listen, seconds } => udp_sink(*listen, *seconds),
        Tool::UdpBlast {
            connect,
            seconds,
            size,
        } => udp_blast(*connect, *seconds, *size),
    }
}

fn crr_server(listen: SocketAddr) -> Result<()> {
    let listener = TcpListener::bind(listen).with_context(|| format!("bind {listen}"))?;
    for conn in listener.incoming() {
        let Ok(mut conn) = conn else { continue };
        let _ = conn.set_read_timeout(Some(Duration::from_secs(2)));
        let _ = conn.set_nodelay(true);
        let mut buf = [0u8; CRR_MSG];
        if conn.read_exact(&mut buf).is_ok() {
            let _ = conn.write_all(&buf);
        }
        // Dropping closes; the server side holds TIME_WAIT, so the client never
        // runs out of ephemeral ports.
    }
    Ok(())
}

fn crr_once(connect: SocketAddr) -> Result<()> {
    let mut s = TcpStream::connect_timeout(&connect, Duration::from_secs(2))?;
    s.set_nodelay(true)?;
    s.set_read_timeout(Some(Duration::from_secs(2)))?;
    let req = [7u8; CRR_MSG];
    s.write_all(&req)?;
    let mut resp = [0u8; CRR_MSG];
    s.read_exact(&mut resp)?;
    if resp != req {
        bail!("wrong answer");
    }
    // Wait for the server's FIN so the server closes first.
    let mut rest = [0u8; 1];
    let _ = s.read(&mut rest);
    Ok(())
}

fn crr_client(connect: SocketAddr, seconds: f64, count: u64) -> Result<()> {
    let start = Instant::now();
    let limit = Duration::from_secs_f64(seconds);
    let (mut ok, mut failed) = (0u64, 0u64);
    loop {
        if count > 0 && ok + failed >= count {
            break;
        }
        if count == 0 && start.elapsed() >= limit {
            break;
        }
        match crr_once(connect) {
            Ok(()) => ok += 1,
            Err(e) => {
                failed += 1;
                if count > 0 {
                    bail!("connection to {connect} failed: {e}");
                }
            }
        }
    }
    let secs = start.elapsed().as_secs_f64();
    println!(
        "conns={ok} failed={failed} secs={secs:.6} rate={:.1}",
        ok as f64 / secs
    );
    Ok(())
}

fn udp_sink(listen: SocketAddr, seconds: f64) -> Result<()> {
    let sock = UdpSocket::bind(listen).with_context(|| format!("bind {listen}"))?;
    sock.set_read_timeout(Some(Duration::from_millis(500)))?;
    let deadline = Instant::now() + Duration::from_secs_f64(seconds);
    let mut buf = [0u8; 2048];
    let mut count = 0u64;
    let mut first = None;
    let mut last = Instant::now();
    // Ready marker on stderr for whoever waits for the bind.
    eprintln!("ready");
    while Instant::now() < deadline {
        match sock.recv(&mut buf) {
            Ok(_) => {
                last = Instant::now();
                if first.is_none() {
                    first = Some(last);
                } else {
                    count += 1;
                }
            }
            Err(_) if first.is_some() => break, // idle: the sender finished
            Err(_) => {}
        }
    }
    let secs = first.map(|f| (last - f).as_secs_f64()).unwrap_or(0.0);
    let rate = if secs > 0.0 { count as f64 / secs } else { 0.0 };
    println!("packets={count} secs={secs:.6} rate={rate:.1}");
    Ok(())
}

fn udp_blast(connect: SocketAddr, seconds: f64, size: usize) -> Result<()> {
    let sock = UdpSocket::bind("0.0.0.0:0")?;
    sock.connect(connect)?;
    let payload = vec![0x5au8; size];
    let start = Instant::now();
    let limit = Duration::from_secs_f64(seconds);
    let mut sent = 0u64;
    while start.elapsed() < limit {
        for _ in 0..64 {
            if sock.send(&payload).is_ok() {
                sent += 1;
            }
        }
    }
    let secs = start.elapsed().as_secs_f64();
    println!("sent={sent} secs={secs:.6} rate={:.1}", sent as f64 / secs);
    Ok(())
}

/// One connect/request/close from `guest_ns` to `ip:port`.
pub fn probe(guest_ns: &str, ip: &str, port: u16) -> Result<()> {
    let xtask = std::env::current_exe()?;
    let mut last = None;
    for _ in 0..3 {
        match run_bounded(
            ns_cmd(guest_ns, &xtask.to_string_lossy()).args([
                "bench",
                "crr-client",
                "--connect",
                &format!("{ip}:{port}"),
                "--count",
                "1",
            ]),
            Duration::from_secs(10),
        ) {
            Ok(_) => return Ok(()),
            Err(e) => last = Some(e),
        }
        std::thread::sleep(Duration::from_millis(300));
    }
    Err(last.expect("tried"))
}

/// Parses `key=value` from a tool's output line.
pub fn field(out: &str, key: &str) -> Option<f64> {
    out.split_whitespace()
        .find_map(|kv| kv.strip_prefix(key).and_then(|v| v.strip_prefix('=')))
        .and_then(|v| v.parse().ok())
}
