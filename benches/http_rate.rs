//! Latency at a fixed request rate: an open-loop load over keep-alive connections, each
//! sending on its own schedule (staggered, evenly spaced) whatever the answers do. Latency
//! is counted from the scheduled send time, so a stall is charged to every request it
//! delays (no coordinated omission, unlike a closed loop such as `wrk`).
//!
//! `cargo bench --bench http_rate -- URL HEADER RATE CONNECTIONS SECONDS`, where URL is
//! `http://host:port/path` and HEADER one request header line (`Authorization: Bearer …`).
//! softhsm/bench.sh runs it at half the saturation rate that `wrk` measured.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

struct Outcome {
    latencies_us: Vec<u64>,
    failures: u64,
}

fn main() {
    let args: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| a != "--bench")
        .collect();
    let [url, header, rate, conns, secs] = args.as_slice() else {
        eprintln!("usage: http_rate URL HEADER RATE CONNECTIONS SECONDS");
        std::process::exit(2);
    };
    let rate: f64 = rate.parse().expect("RATE");
    let conns: usize = conns.parse().expect("CONNECTIONS");
    let secs: f64 = secs.parse().expect("SECONDS");
    let rest = url.strip_prefix("http://").expect("http:// URL");
    let (host, path) = rest.split_at(rest.find('/').unwrap_or(rest.len()));
    let request = format!("GET {path} HTTP/1.1\r\nHost: {host}\r\n{header}\r\n\r\n");

    let period = Duration::from_secs_f64(conns as f64 / rate);
    let start = Instant::now() + Duration::from_millis(100);
    let end = start + Duration::from_secs_f64(secs);
    let workers: Vec<_> = (0..conns)
        .map(|i| {
            let (host, request) = (host.to_owned(), request.clone());
            let offset = period.mul_f64(i as f64 / conns as f64);
            std::thread::spawn(move || run(&host, &request, start + offset, period, end))
        })
        .collect();
    let mut all = Outcome {
        latencies_us: Vec::new(),
        failures: 0,
    };
    for w in workers {
        let o = w.join().expect("worker");
        all.latencies_us.extend(o.latencies_us);
        all.failures += o.failures;
    }
    let lat = &mut all.latencies_us;
    lat.sort_unstable();
    let pct = |p: f64| {
        let i = ((lat.len() as f64 * p).ceil() as usize).clamp(1, lat.len().max(1)) - 1;
        lat.get(i).map_or(0.0, |&v| v as f64 / 1000.0)
    };
    println!(
        "rate target={rate:.0}/s achieved={:.0}/s connections={conns} p50={:.2}ms p99={:.2}ms \
         p99.9={:.2}ms max={:.2}ms non200={}",
        lat.len() as f64 / secs,
        pct(0.50),
        pct(0.99),
        pct(0.999),
        pct(1.0),
        all.failures
    );
}

fn run(host: &str, request: &str, first: Instant, period: Duration, end: Instant) -> Outcome {
    let mut out = Outcome {
        latencies_us: Vec::new(),
        failures: 0,
    };
    let stream = TcpStream::connect(host).expect("connect");
    stream.set_nodelay(true).expect("nodelay");
    let mut writer = stream.try_clone().expect("clone");
    let mut reader = BufReader::new(stream);
    let mut due = first;
    let mut line = String::new();
    let mut body = Vec::new();
    while due < end {
        if let Some(wait) = due.checked_duration_since(Instant::now()) {
            std::thread::sleep(wait);
        }
        writer.write_all(request.as_bytes()).expect("send");
        line.clear();
        reader.read_line(&mut line).expect("status line");
        let ok = line.split(' ').nth(1) == Some("200");
        let mut length = 0usize;
        loop {
            line.clear();
            reader.read_line(&mut line).expect("header");
            let h = line.trim_end();
            if h.is_empty() {
                break;
            }
            if let Some((name, value)) = h.split_once(':')
                && name.eq_ignore_ascii_case("content-length")
            {
                length = value.trim().parse().expect("content-length");
            }
        }
        body.resize(length, 0);
        reader.read_exact(&mut body).expect("body");
        out.latencies_us
            .push(Instant::now().duration_since(due).as_micros() as u64);
        if !ok {
            out.failures += 1;
        }
        due += period;
    }
    out
}
