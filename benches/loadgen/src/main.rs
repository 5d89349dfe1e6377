//! Fan-out load generator for `benches/suite.py`.
//!
//! Opens N WebSocket subscribers spread over C channels on a server at 127.0.0.1, then one
//! publisher sends messages round-robin over the channels: first M as fast as the server
//! accepts them (a window of W unacknowledged), then, paced, at a fraction of the peak rate
//! for the latency measurement. Each message carries its send time (nanoseconds since this
//! process started, monotonic) and sequence number in its data, `{"t":..,"s":..,"p":"xx.."}`
//! padded to `--size` bytes; subscribers record arrival minus send time.
//!
//! Targets (`--target`):
//! - `pyrt`: subscribers speak the native protocol on `/connection/websocket` (`join`). The
//!   publisher (`--publisher`) either POSTs to the REST API's `/api/publish` over W keep-alive
//!   connections with `--api-key` (`http`, what Nchan's publisher does), or sends `publish`
//!   commands with `ack` over one WebSocket, W in flight (`ws`: pipelined, which lets the hub
//!   cork a burst into one write per subscriber); the server must allow publishing without
//!   joining (`publish_requires_join = false`).
//! - `nchan`: WebSocket subscribers on `/sub/<channel>`, publishing by HTTP POST to
//!   `/pub/<channel>` over W keep-alive connections.
//! - `socketio`: Engine.IO v4 / Socket.IO v5 over WebSocket (`/socket.io/?EIO=4&transport=websocket`):
//!   `40` connect, `42["join",channel]` with an ack, `42["publish",{channel,data}]` with an
//!   ack; deliveries are `42["pub",data]` events. The server's `2` pings get `3` pongs.
//!
//! With `--idle` it only connects (and joins) and holds the connections until a line (or EOF)
//! arrives on stdin, for measuring the server's memory per connection.
//!
//! With `--joins FILE` (pyrt only; `benches/wal_latency.py`) it watches row changes published
//! by someone else: FILE holds one join command (a JSON text frame) per line, and subscriber i
//! sends line `i % lines` instead of the channel join. There is no publisher and no peak or
//! paced phase. Once every subscriber has joined it prints `{"phase":"connected",..}`, counts
//! every delivery (`{"push":"pub"`) and records wall-clock arrival (epoch) minus the event's
//! `"sent":<epoch seconds>` field together with `sent`. Then it reads one line from stdin,
//! `{"from": <epoch s>, "expected": <deliveries>, "drain": <s>}`, waits until `expected`
//! deliveries arrived in all or `drain` seconds passed, and reports latency over the samples
//! sent at or after `from`.
//!
//! The `--joins` subscribers read their sockets raw: the HTTP upgrade and the join by hand,
//! then server frames parsed in place from a reusable buffer, with one clock reading per
//! read. On a small machine their CPU competes with the server they measure, and ~100k reads
//! a second through tungstenite (which zeroes its read buffer on every read) took ~70% of a
//! core. The other modes use tungstenite.
//!
//! Stdout: one JSON line per phase boundary (`{"phase": ...}`), so the harness can sample the
//! server's CPU time at the same instants, then the result as one JSON object.

use std::io::Write as _;
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use futures_util::{SinkExt, StreamExt};
use serde_json::{json, Value};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpSocket, TcpStream};
use tokio::sync::{mpsc, Notify, Semaphore};
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::tungstenite::{Message, Utf8Bytes};
use tokio_tungstenite::WebSocketStream;

type Ws = WebSocketStream<TcpStream>;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Target {
    Pyrt,
    Nchan,
    Socketio,
}

/// How messages are published: HTTP POSTs over W keep-alive connections, or commands
/// pipelined over one WebSocket with W awaiting their acknowledgement.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Publisher {
    Http,
    Ws,
}

impl Publisher {
    fn name(self) -> &'static str {
        match self {
            Publisher::Http => "http",
            Publisher::Ws => "ws",
        }
    }
}

impl Target {
    fn name(self) -> &'static str {
        match self {
            Target::Pyrt => "pyrt",
            Target::Nchan => "nchan",
            Target::Socketio => "socketio",
        }
    }
}

const USAGE: &str = "usage: pyrt-loadgen --target pyrt|nchan|socketio --port N [options]

  --channels C             channels; subscriber i joins channel i % C (default 1)
  --subscribers N          subscriber connections in all (default 1000)
  --messages M             messages in the peak phase, round-robin over channels (default 100)
  --size B                 bytes of each message's data, as JSON (default 100)
  --window W               publishes in flight; with an HTTP publisher, its keep-alive
                           connections (default 64)
  --publisher http|ws      pyrt only: POST to /api/publish (needs --api-key), or `publish`
                           commands pipelined over one WebSocket (default ws); nchan always
                           publishes over HTTP, socketio over its WebSocket
  --api-key KEY            the REST API key, for --publisher http
  --paced-fraction F       paced phase rate as a fraction of the peak message rate;
                           0: no paced phase (default 0.5)
  --paced-rate R           paced phase rate in messages/s (overrides --paced-fraction)
  --paced-seconds S        length of the paced phase; at least 20 messages (default 4)
  --connect-concurrency K  connection attempts in flight (default 64)
  --timeout S              seconds a phase may take before it is cut short (default 120)
  --threads T              runtime threads; 1: a current-thread runtime (default 1)
  --latency-every K        record latency on every K-th subscriber (default 1)
  --prefix P               channel name prefix; unique per run (default bench)
  --idle                   only connect; hold until a line or EOF on stdin
  --joins FILE             pyrt only: watch row changes published by others; subscriber i
                           sends line i % lines of FILE (a join command) as its join; after
                           the `connected` line, reads {\"from\":..,\"expected\":..,\"drain\":..}
                           from stdin and reports latency (now minus the event's \"sent\")
";

#[derive(Debug, Clone)]
struct Args {
    target: Target,
    port: u16,
    publisher: Publisher,
    /// `--api-key`: sent as `authorization: Bearer` by the pyrt HTTP publisher.
    api_key: Option<String>,
    channels: usize,
    subscribers: usize,
    messages: usize,
    size: usize,
    window: usize,
    paced_fraction: f64,
    paced_rate: Option<f64>,
    paced_seconds: f64,
    connect_concurrency: usize,
    timeout: f64,
    threads: usize,
    idle: bool,
    prefix: String,
    latency_every: usize,
    /// `--joins`: one join frame per line of the file.
    joins: Option<Vec<String>>,
}

impl Args {
    fn parse(argv: impl Iterator<Item = String>) -> Result<Args, String> {
        let mut args = Args {
            target: Target::Pyrt,
            port: 0,
            publisher: Publisher::Ws,
            api_key: None,
            channels: 1,
            subscribers: 1000,
            messages: 100,
            size: 100,
            window: 64,
            paced_fraction: 0.5,
            paced_rate: None,
            paced_seconds: 4.0,
            connect_concurrency: 64,
            timeout: 120.0,
            threads: 1,
            idle: false,
            prefix: "bench".into(),
            latency_every: 1,
            joins: None,
        };
        let (mut target, mut port, mut publisher) = (None, None, None);
        let mut argv = argv;
        while let Some(flag) = argv.next() {
            if flag == "--idle" {
                args.idle = true;
                continue;
            }
            if flag == "-h" || flag == "--help" {
                return Err(String::new());
            }
            let value = argv.next().ok_or_else(|| format!("{flag} needs a value"))?;
            fn num<T: std::str::FromStr>(flag: &str, value: &str) -> Result<T, String> {
                value
                    .parse()
                    .map_err(|_| format!("{flag}: not a valid number: {value:?}"))
            }
            match flag.as_str() {
                "--target" => {
                    target = Some(match value.as_str() {
                        "pyrt" => Target::Pyrt,
                        "nchan" => Target::Nchan,
                        "socketio" => Target::Socketio,
                        _ => return Err(format!("--target: unknown target {value:?}")),
                    })
                }
                "--port" => port = Some(num(&flag, &value)?),
                "--publisher" => {
                    publisher = Some(match value.as_str() {
                        "http" => Publisher::Http,
                        "ws" => Publisher::Ws,
                        _ => return Err(format!("--publisher: http or ws, not {value:?}")),
                    })
                }
                "--api-key" => {
                    if value.is_empty() || value.bytes().any(|b| !b.is_ascii_graphic()) {
                        return Err("--api-key: printable ASCII without spaces".into());
                    }
                    args.api_key = Some(value)
                }
                "--channels" => args.channels = num(&flag, &value)?,
                "--subscribers" => args.subscribers = num(&flag, &value)?,
                "--messages" => args.messages = num(&flag, &value)?,
                "--size" => args.size = num(&flag, &value)?,
                "--window" => args.window = num(&flag, &value)?,
                "--paced-fraction" => args.paced_fraction = num(&flag, &value)?,
                "--paced-rate" => args.paced_rate = Some(num(&flag, &value)?),
                "--paced-seconds" => args.paced_seconds = num(&flag, &value)?,
                "--connect-concurrency" => args.connect_concurrency = num(&flag, &value)?,
                "--timeout" => args.timeout = num(&flag, &value)?,
                "--threads" => args.threads = num(&flag, &value)?,
                "--latency-every" => args.latency_every = num(&flag, &value)?,
                "--prefix" => args.prefix = value,
                "--joins" => {
                    let text = std::fs::read_to_string(&value)
                        .map_err(|e| format!("--joins: cannot read {value}: {e}"))?;
                    let lines: Vec<String> = text
                        .lines()
                        .map(str::trim)
                        .filter(|l| !l.is_empty())
                        .map(String::from)
                        .collect();
                    if lines.is_empty() {
                        return Err(format!("--joins: no join commands in {value}"));
                    }
                    args.joins = Some(lines);
                }
                _ => return Err(format!("unknown option {flag}")),
            }
        }
        args.target = target.ok_or("--target is required")?;
        args.port = port.ok_or("--port is required")?;
        args.publisher = match (args.target, publisher) {
            (Target::Pyrt, chosen) => chosen.unwrap_or(Publisher::Ws),
            (Target::Nchan, None | Some(Publisher::Http)) => Publisher::Http,
            (Target::Socketio, None | Some(Publisher::Ws)) => Publisher::Ws,
            (target, Some(p)) => {
                let name = target.name();
                return Err(format!("--publisher {}: not for {name}", p.name()));
            }
        };
        if args.target == Target::Pyrt
            && args.publisher == Publisher::Http
            && args.api_key.is_none()
        {
            return Err("--publisher http needs --api-key (the REST API's key)".into());
        }
        if args.channels == 0 || (args.subscribers == 0 && !args.idle) {
            return Err("--channels and --subscribers must be at least 1".into());
        }
        if args.subscribers > 20_000 * 200 {
            return Err("at most 4,000,000 subscribers".into());
        }
        if !args.prefix.bytes().all(|b| b.is_ascii_alphanumeric()) {
            return Err("--prefix: letters and digits only".into());
        }
        if args.joins.is_some() && (args.target != Target::Pyrt || args.idle) {
            return Err("--joins: only with --target pyrt, and not with --idle".into());
        }
        Ok(args)
    }
}

/// Progress of one phase (0: peak, 1: paced) across all subscribers.
struct Phase {
    pending: AtomicUsize,
    delivered: AtomicU64,
    end_ns: AtomicU64,
    last_delivery_ns: AtomicU64,
    done: Notify,
    latencies_us: Mutex<Vec<u32>>,
}

impl Phase {
    fn new(subscribers: usize) -> Self {
        Phase {
            pending: AtomicUsize::new(subscribers),
            delivered: AtomicU64::new(0),
            end_ns: AtomicU64::new(0),
            last_delivery_ns: AtomicU64::new(0),
            done: Notify::new(),
            latencies_us: Mutex::new(Vec::new()),
        }
    }

    /// One subscriber has everything it expects in this phase (or is gone).
    fn finish_one(&self, now_ns: u64) {
        if self.pending.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.end_ns.store(now_ns, Ordering::Release);
            self.done.notify_one();
        }
    }
}

struct Shared {
    start: Instant,
    peak_messages: u64,
    phases: [Phase; 2],
    connected: AtomicUsize,
    connect_failed: AtomicUsize,
    connect_done: Notify,
    subscribers: usize,
    errors: AtomicU64,
    error_samples: Mutex<Vec<String>>,
    /// Expected messages per channel per phase, set before each phase starts.
    expected: [Mutex<Vec<u64>>; 2],
    expected_set: [AtomicBool; 2],
    expected_ready: [Notify; 2],
}

impl Shared {
    fn now_ns(&self) -> u64 {
        self.start.elapsed().as_nanos() as u64
    }

    fn error(&self, message: String) {
        self.errors.fetch_add(1, Ordering::Relaxed);
        let mut samples = self.error_samples.lock().unwrap();
        if samples.len() < 10 {
            samples.push(message);
        }
    }

    fn connect_finished(&self) {
        let done =
            self.connected.load(Ordering::Acquire) + self.connect_failed.load(Ordering::Acquire);
        if done == self.subscribers {
            self.connect_done.notify_one();
        }
    }

    async fn expected_for(&self, phase: usize, channel: usize) -> u64 {
        loop {
            let notified = self.expected_ready[phase].notified();
            if self.expected_set[phase].load(Ordering::Acquire) {
                return self.expected[phase].lock().unwrap()[channel];
            }
            notified.await;
        }
    }

    fn set_expected(&self, phase: usize, counts: Vec<u64>) {
        *self.expected[phase].lock().unwrap() = counts;
        self.expected_set[phase].store(true, Ordering::Release);
        self.expected_ready[phase].notify_waiters();
    }
}

/// Row-watching mode (`--joins`): deliveries across all subscribers and their samples.
struct Watch {
    delivered: AtomicU64,
    /// Deliveries wanted (from the stdin line); reaching it wakes `reached`.
    expected: AtomicU64,
    reached: Notify,
    /// Samples recorded in all, against `MAX_SAMPLES`; past it they are only counted.
    recorded: AtomicUsize,
    /// One store per sampling subscriber, so recording takes no lock another task holds
    /// (except at the end, when the report collects them).
    stores: Mutex<Vec<Arc<Mutex<Samples>>>>,
}

/// At most this many latency samples are kept (12 bytes each).
const MAX_SAMPLES: usize = 10_000_000;

#[derive(Default)]
struct Samples {
    latency_us: Vec<u32>,
    /// The event's `sent` (epoch seconds), so the report can leave out the warm-up.
    sent: Vec<f64>,
}

impl Watch {
    fn new() -> Self {
        Watch {
            delivered: AtomicU64::new(0),
            expected: AtomicU64::new(u64::MAX),
            reached: Notify::new(),
            recorded: AtomicUsize::new(0),
            stores: Mutex::new(Vec::new()),
        }
    }
}

fn channel_name(prefix: &str, index: usize) -> String {
    format!("{prefix}c{index}")
}

fn ws_config() -> WebSocketConfig {
    // Small buffers: 50k idle connections must not cost the load generator gigabytes.
    WebSocketConfig::default()
        .read_buffer_size(16 * 1024)
        .write_buffer_size(0)
}

fn raise_nofile_limit() -> u64 {
    // SAFETY: plain libc calls on a local struct.
    unsafe {
        let mut limit = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) != 0 {
            return 0;
        }
        let nr_open = std::fs::read_to_string("/proc/sys/fs/nr_open")
            .ok()
            .and_then(|s| s.trim().parse::<u64>().ok())
            .unwrap_or(limit.rlim_max);
        // Raising the hard limit works as root (CAP_SYS_RESOURCE); otherwise the soft one
        // goes up to the hard one.
        let wanted = libc::rlimit {
            rlim_cur: nr_open,
            rlim_max: nr_open,
        };
        if libc::setrlimit(libc::RLIMIT_NOFILE, &wanted) != 0 {
            let soft = libc::rlimit {
                rlim_cur: limit.rlim_max,
                rlim_max: limit.rlim_max,
            };
            libc::setrlimit(libc::RLIMIT_NOFILE, &soft);
        }
        libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit);
        limit.rlim_cur
    }
}

fn cpu_seconds() -> f64 {
    // SAFETY: getrusage fills a local struct.
    unsafe {
        let mut usage: libc::rusage = std::mem::zeroed();
        libc::getrusage(libc::RUSAGE_SELF, &mut usage);
        let tv = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
        tv(usage.ru_utime) + tv(usage.ru_stime)
    }
}

fn rss_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1).and_then(|v| v.parse().ok()))
        })
        .unwrap_or(0)
}

fn say(value: Value) {
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "{value}");
    let _ = out.flush();
}

/// Opens a TCP connection to 127.0.0.1:port. Past ~20k connections the ephemeral ports of
/// one source address run short, so connections are spread over source addresses 127.0.0.x
/// (still loopback; the destination is always 127.0.0.1).
async fn open_tcp(port: u16, index: usize, spread: bool) -> Result<TcpStream, String> {
    let socket = TcpSocket::new_v4().map_err(|e| format!("socket: {e}"))?;
    if spread {
        let local = Ipv4Addr::new(127, 0, 0, 1 + (index / 20_000) as u8);
        let one: libc::c_int = 1;
        // SAFETY: setsockopt on a socket we own, with a pointer to a local int.
        unsafe {
            libc::setsockopt(
                socket.as_raw_fd(),
                libc::IPPROTO_IP,
                libc::IP_BIND_ADDRESS_NO_PORT,
                &one as *const libc::c_int as *const libc::c_void,
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            );
        }
        socket
            .bind(SocketAddr::V4(SocketAddrV4::new(local, 0)))
            .map_err(|e| format!("bind {local}: {e}"))?;
    }
    let server = SocketAddr::V4(SocketAddrV4::new(Ipv4Addr::LOCALHOST, port));
    let stream = socket
        .connect(server)
        .await
        .map_err(|e| format!("connect: {e}"))?;
    stream
        .set_nodelay(true)
        .map_err(|e| format!("nodelay: {e}"))?;
    Ok(stream)
}

/// Opens a WebSocket to 127.0.0.1:port (see `open_tcp`).
async fn open_ws(port: u16, path: &str, index: usize, spread: bool) -> Result<Ws, String> {
    let stream = open_tcp(port, index, spread).await?;
    let url = format!("ws://127.0.0.1:{port}{path}");
    let (ws, _) = tokio_tungstenite::client_async_with_config(url, stream, Some(ws_config()))
        .await
        .map_err(|e| format!("upgrade {path}: {e}"))?;
    Ok(ws)
}

async fn next_text(ws: &mut Ws) -> Result<String, String> {
    loop {
        match ws.next().await {
            Some(Ok(Message::Text(text))) => return Ok(text.as_str().to_owned()),
            Some(Ok(Message::Close(frame))) => return Err(format!("closed: {frame:?}")),
            Some(Ok(_)) => continue,
            Some(Err(e)) => return Err(format!("read: {e}")),
            None => return Err("closed".into()),
        }
    }
}

async fn send_text(ws: &mut Ws, text: String) -> Result<(), String> {
    ws.send(Message::text(text))
        .await
        .map_err(|e| format!("write: {e}"))
}

/// Socket.IO: reads the Engine.IO open packet, connects to the default namespace.
async fn socketio_connect(ws: &mut Ws) -> Result<(), String> {
    let open = next_text(ws).await?;
    if !open.starts_with('0') {
        return Err(format!("expected an Engine.IO open packet, got {open:.80}"));
    }
    send_text(ws, "40".into()).await?;
    loop {
        let frame = next_text(ws).await?;
        if frame.starts_with("40") {
            return Ok(());
        }
        if frame.starts_with("44") {
            return Err(format!("namespace connect refused: {frame:.80}"));
        }
        if frame == "2" {
            send_text(ws, "3".into()).await?;
        }
    }
}

/// Connects one subscriber and joins its channel (for pyrt and Socket.IO: until the reply).
/// (`--joins` subscribers connect with `connect_raw`.)
async fn connect_subscriber(args: &Args, index: usize, channel: &str) -> Result<Ws, String> {
    let spread = args.subscribers > 20_000;
    match args.target {
        Target::Pyrt => {
            let mut ws = open_ws(args.port, "/connection/websocket", index, spread).await?;
            let join = json!({"cmd": "join", "id": 1, "channel": channel}).to_string();
            send_text(&mut ws, join).await?;
            loop {
                let frame = next_text(&mut ws).await?;
                if frame.starts_with("{\"reply\":1,") {
                    if frame.contains("\"ok\"") {
                        return Ok(ws);
                    }
                    return Err(format!("join refused: {frame:.120}"));
                }
            }
        }
        Target::Nchan => open_ws(args.port, &format!("/sub/{channel}"), index, spread).await,
        Target::Socketio => {
            let path = "/socket.io/?EIO=4&transport=websocket";
            let mut ws = open_ws(args.port, path, index, spread).await?;
            socketio_connect(&mut ws).await?;
            send_text(&mut ws, format!("421[\"join\",\"{channel}\"]")).await?;
            loop {
                let frame = next_text(&mut ws).await?;
                if frame.starts_with("431") {
                    return Ok(ws);
                }
                if frame == "2" {
                    send_text(&mut ws, "3".into()).await?;
                }
            }
        }
    }
}

/// Finds `"key":<digits>` in a frame.
fn number_after(frame: &str, key: &str) -> Option<u64> {
    let at = frame.find(key)? + key.len();
    let digits = frame[at..].bytes().take_while(u8::is_ascii_digit).count();
    frame[at..at + digits].parse().ok()
}

/// Finds `key` (a `memmem::Finder` for `"name":`) followed by a JSON number in a frame, as
/// a finite f64. (memchr's vectorised search: `str::find` was a third of the watcher's CPU
/// on row events of a few hundred bytes.)
fn float_after(frame: &[u8], key: &memchr::memmem::Finder<'_>) -> Option<f64> {
    let at = key.find(frame)? + key.needle().len();
    let rest = frame[at..].trim_ascii_start();
    let len = rest
        .iter()
        .take_while(|b| b.is_ascii_digit() || matches!(b, b'.' | b'-' | b'+' | b'e' | b'E'))
        .count();
    // The bytes taken are ASCII, so valid UTF-8.
    std::str::from_utf8(&rest[..len])
        .ok()?
        .parse::<f64>()
        .ok()
        .filter(|v| v.is_finite())
}

fn epoch_seconds() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}

fn is_delivery(target: Target, frame: &str) -> bool {
    match target {
        Target::Pyrt => frame.starts_with("{\"push\":\"pub\""),
        Target::Nchan => frame.contains("\"t\":"),
        Target::Socketio => frame.starts_with("42[\"pub\""),
    }
}

/// Runs `attempt` (connecting and joining subscriber `index`) within the connection-attempt
/// limit, and counts the outcome (a failure is recorded as an error).
async fn connect_counted<T>(
    shared: &Shared,
    connect: &Semaphore,
    index: usize,
    attempt: impl std::future::Future<Output = Result<T, String>>,
) -> Option<T> {
    let permit = connect.acquire().await.expect("semaphore closed");
    let result = attempt.await;
    drop(permit);
    let ws = match result {
        Ok(ws) => {
            shared.connected.fetch_add(1, Ordering::AcqRel);
            Some(ws)
        }
        Err(e) => {
            shared.error(format!("subscriber {index}: {e}"));
            shared.connect_failed.fetch_add(1, Ordering::AcqRel);
            None
        }
    };
    shared.connect_finished();
    ws
}

/// Reads frames until the next delivery, answering the server's pings on the way and
/// ignoring other frames. None: the connection is gone (recorded as an error).
async fn next_delivery(
    ws: &mut Ws,
    target: Target,
    shared: &Shared,
    index: usize,
) -> Option<Utf8Bytes> {
    loop {
        let message = match ws.next().await {
            Some(Ok(Message::Text(text))) => text,
            Some(Ok(Message::Close(frame))) => {
                shared.error(format!(
                    "subscriber {index}: closed by the server: {frame:?}"
                ));
                return None;
            }
            Some(Ok(_)) => continue,
            Some(Err(e)) => {
                shared.error(format!("subscriber {index}: {e}"));
                return None;
            }
            None => {
                shared.error(format!("subscriber {index}: connection ended"));
                return None;
            }
        };
        let frame = message.as_str();
        if is_delivery(target, frame) {
            return Some(message);
        }
        let reply = match (target, frame) {
            (Target::Socketio, "2") => Some("3".to_owned()),
            // Answer the server's pings with one, so idle connections stay within the
            // server's idle timeout.
            (Target::Pyrt, f) if f.starts_with("{\"push\":\"ping\"") => {
                Some("{\"cmd\":\"ping\"}".to_owned())
            }
            _ => None,
        };
        if let Some(reply) = reply {
            if let Err(e) = send_text(ws, reply).await {
                shared.error(format!("subscriber {index}: {e}"));
                return None;
            }
        }
    }
}

async fn subscriber(args: Arc<Args>, shared: Arc<Shared>, connect: Arc<Semaphore>, index: usize) {
    let channel_index = index % args.channels;
    let channel = channel_name(&args.prefix, channel_index);
    let attempt = connect_subscriber(&args, index, &channel);
    let Some(mut ws) = connect_counted(&shared, &connect, index, attempt).await else {
        let now = shared.now_ns();
        shared.phases.iter().for_each(|p| p.finish_one(now));
        return;
    };
    let sample = index.is_multiple_of(args.latency_every.max(1));
    let mut phase = 0usize;
    let mut expected = if args.idle {
        u64::MAX
    } else {
        shared.expected_for(0, channel_index).await
    };
    let mut received = 0u64;
    let mut latencies: Vec<u32> = Vec::new();
    let mut finished = [false, false];
    // A phase in which this subscriber expects nothing is done at once.
    while !args.idle && phase < 2 && received >= expected {
        shared.phases[phase].finish_one(shared.now_ns());
        finished[phase] = true;
        phase += 1;
        received = 0;
        if phase < 2 {
            expected = shared.expected_for(phase, channel_index).await;
        }
    }
    while let Some(message) = next_delivery(&mut ws, args.target, &shared, index).await {
        let frame = message.as_str();
        let now = shared.now_ns();
        let (Some(sent), Some(seq)) =
            (number_after(frame, "\"t\":"), number_after(frame, "\"s\":"))
        else {
            shared.error(format!(
                "subscriber {index}: delivery without t/s: {frame:.80}"
            ));
            continue;
        };
        let message_phase = usize::from(seq >= shared.peak_messages);
        if message_phase != phase || phase >= 2 {
            shared.error(format!(
                "subscriber {index}: message {seq} outside its phase"
            ));
            continue;
        }
        received += 1;
        shared.phases[phase]
            .delivered
            .fetch_add(1, Ordering::Relaxed);
        shared.phases[phase]
            .last_delivery_ns
            .fetch_max(now, Ordering::Relaxed);
        if sample {
            latencies.push((now.saturating_sub(sent) / 1000).min(u32::MAX as u64) as u32);
            if latencies.len() >= 4096 {
                // In batches, so a phase cut short by the timeout still has its samples.
                shared.phases[phase]
                    .latencies_us
                    .lock()
                    .unwrap()
                    .append(&mut latencies);
            }
        }
        while phase < 2 && received >= expected {
            shared.phases[phase]
                .latencies_us
                .lock()
                .unwrap()
                .append(&mut latencies);
            shared.phases[phase].finish_one(now);
            finished[phase] = true;
            phase += 1;
            received = 0;
            if phase < 2 {
                expected = shared.expected_for(phase, channel_index).await;
            }
        }
    }
    // Gone before the end: what it has is counted, the rest is missing.
    let now = shared.now_ns();
    for (p, state) in shared.phases.iter().enumerate() {
        if !finished[p] {
            if p == phase {
                state.latencies_us.lock().unwrap().append(&mut latencies);
            }
            state.finish_one(now);
        }
    }
}

// -- `--joins`: raw WebSocket frames (see the module doc) ------------------------------------

const OP_CONTINUATION: u8 = 0x0;
const OP_TEXT: u8 = 0x1;
const OP_CLOSE: u8 = 0x8;
const OP_PING: u8 = 0x9;
const OP_PONG: u8 = 0xa;

/// A connection's read buffer starts this large; each read has room for at least a quarter
/// of it, so the buffer grows only for a frame longer than that.
const READ_SIZE: usize = 16 * 1024;
/// A server frame longer than this ends the connection (tungstenite's default limit).
const MAX_FRAME: u64 = 16 << 20;

/// One server frame at the start of a buffer: its header and where its payload lies.
struct FrameHead {
    fin: bool,
    opcode: u8,
    payload: std::ops::Range<usize>,
}

/// Parses the frame at the start of `bytes`; None while it is not all there.
fn parse_frame(bytes: &[u8]) -> Result<Option<FrameHead>, String> {
    let [b0, b1, ..] = *bytes else {
        return Ok(None);
    };
    if b0 & 0x70 != 0 {
        return Err(format!("frame with reserved bits set: {b0:#04x}"));
    }
    if b1 & 0x80 != 0 {
        return Err("masked frame from the server".into());
    }
    let (len, head) = match b1 & 0x7f {
        126 => match bytes.get(2..4) {
            Some(b) => (u64::from(u16::from_be_bytes([b[0], b[1]])), 4),
            None => return Ok(None),
        },
        127 => match bytes.get(2..10) {
            Some(b) => (u64::from_be_bytes(b.try_into().expect("8 bytes")), 10),
            None => return Ok(None),
        },
        len => (u64::from(len), 2),
    };
    if len > MAX_FRAME {
        return Err(format!("frame of {len} bytes"));
    }
    let end = head + len as usize;
    Ok((bytes.len() >= end).then_some(FrameHead {
        fin: b0 & 0x80 != 0,
        opcode: b0 & 0x0f,
        payload: head..end,
    }))
}

/// Writes one client frame: FIN set, masked (as a client's frames must be; any key will do).
async fn write_frame(stream: &mut TcpStream, opcode: u8, payload: &[u8]) -> Result<(), String> {
    const KEY: [u8; 4] = [0x5a, 0x1c, 0xe3, 0x77];
    let mut frame = Vec::with_capacity(payload.len() + 14);
    frame.push(0x80 | opcode);
    match payload.len() {
        len @ 0..=125 => frame.push(0x80 | len as u8),
        len @ 126..=0xffff => {
            frame.push(0x80 | 126);
            frame.extend_from_slice(&(len as u16).to_be_bytes());
        }
        len => {
            frame.push(0x80 | 127);
            frame.extend_from_slice(&(len as u64).to_be_bytes());
        }
    }
    frame.extend_from_slice(&KEY);
    frame.extend(payload.iter().zip(KEY.iter().cycle()).map(|(b, k)| b ^ k));
    stream
        .write_all(&frame)
        .await
        .map_err(|e| format!("write: {e}"))
}

/// A close frame's payload, as tungstenite showed it (`None` without a status code).
fn close_frame(payload: &[u8]) -> Option<tokio_tungstenite::tungstenite::protocol::CloseFrame> {
    let [hi, lo, reason @ ..] = payload else {
        return None;
    };
    Some(tokio_tungstenite::tungstenite::protocol::CloseFrame {
        code: u16::from_be_bytes([*hi, *lo]).into(),
        reason: Utf8Bytes::from(String::from_utf8_lossy(reason).into_owned()),
    })
}

/// A WebSocket read raw: `buffer` holds what was read from the socket (into its spare
/// capacity, which is never zeroed); the frames before `taken` were handed out.
struct RawWs {
    stream: TcpStream,
    buffer: Vec<u8>,
    taken: usize,
}

impl RawWs {
    fn new(stream: TcpStream) -> Self {
        RawWs {
            stream,
            buffer: Vec::with_capacity(READ_SIZE),
            taken: 0,
        }
    }

    /// Drops what was handed out (keeping a partial frame), waits until the socket is
    /// readable and appends what it holds (one read).
    async fn read(&mut self) -> Result<(), String> {
        self.buffer.drain(..self.taken);
        self.taken = 0;
        if self.buffer.capacity() - self.buffer.len() < READ_SIZE / 4 {
            self.buffer.reserve(READ_SIZE);
        }
        loop {
            self.stream
                .readable()
                .await
                .map_err(|e| format!("read: {e}"))?;
            match self.stream.try_read_buf(&mut self.buffer) {
                Ok(0) => return Err("connection ended".into()),
                Ok(_) => return Ok(()),
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => continue,
                Err(e) => return Err(format!("read: {e}")),
            }
        }
    }

    /// The next text frame in the buffer (where its payload lies in `buffer`); None when no
    /// complete frame is left. Pings on the way are answered: the server's WebSocket pings
    /// with a pong, pyrt's `{"push":"ping"}` with `{"cmd":"ping"}` (so idle connections stay
    /// within the server's idle timeout). A close or any other frame ends the connection
    /// (Err); the server sends neither binary nor fragmented frames.
    async fn next_text(&mut self) -> Result<Option<std::ops::Range<usize>>, String> {
        loop {
            let Some(frame) = parse_frame(&self.buffer[self.taken..])? else {
                return Ok(None);
            };
            let payload = self.taken + frame.payload.start..self.taken + frame.payload.end;
            self.taken = payload.end;
            let bytes = &self.buffer[payload.clone()];
            match (frame.fin, frame.opcode) {
                (true, OP_TEXT) if bytes.starts_with(b"{\"push\":\"ping\"") => {
                    write_frame(&mut self.stream, OP_TEXT, b"{\"cmd\":\"ping\"}").await?
                }
                (true, OP_TEXT) => return Ok(Some(payload)),
                (true, OP_PING) => write_frame(&mut self.stream, OP_PONG, bytes).await?,
                (true, OP_PONG) => {}
                (_, OP_CLOSE) => {
                    return Err(format!("closed by the server: {:?}", close_frame(bytes)))
                }
                (fin, opcode) => {
                    let kind = if opcode == OP_CONTINUATION {
                        "continuation"
                    } else {
                        "unexpected"
                    };
                    return Err(format!("{kind} frame: opcode {opcode}, fin {fin}"));
                }
            }
        }
    }
}

/// Opens a `--joins` subscriber's connection by hand: the HTTP upgrade, then its join
/// command, until the reply (the first text frame starting with `{"reply":1,`). Whatever
/// arrived after the reply stays in the buffer for the watcher.
async fn connect_raw(args: &Args, index: usize, join: &str) -> Result<RawWs, String> {
    use tokio_tungstenite::tungstenite::handshake::{client::generate_key, derive_accept_key};
    let stream = open_tcp(args.port, index, args.subscribers > 20_000).await?;
    let mut ws = RawWs::new(stream);
    let key = generate_key();
    let request = format!(
        "GET /connection/websocket HTTP/1.1\r\nHost: 127.0.0.1:{}\r\nConnection: Upgrade\r\n\
         Upgrade: websocket\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Key: {key}\r\n\r\n",
        args.port
    );
    ws.stream
        .write_all(request.as_bytes())
        .await
        .map_err(|e| format!("upgrade: write: {e}"))?;
    let head_end = loop {
        if let Some(at) = memchr::memmem::find(&ws.buffer, b"\r\n\r\n") {
            break at + 4;
        }
        if ws.buffer.len() > 64 * 1024 {
            return Err("upgrade: response head too long".into());
        }
        ws.read().await.map_err(|e| format!("upgrade: {e}"))?;
    };
    let head = String::from_utf8_lossy(&ws.buffer[..head_end]).into_owned();
    if !head.starts_with("HTTP/1.1 101 ") {
        let status = head.lines().next().unwrap_or("");
        return Err(format!("upgrade: {status:.120}"));
    }
    let accept = derive_accept_key(key.as_bytes());
    let accepted = head.lines().any(|line| {
        line.split_once(':').is_some_and(|(name, value)| {
            name.trim().eq_ignore_ascii_case("sec-websocket-accept") && value.trim() == accept
        })
    });
    if !accepted {
        return Err("upgrade: no matching Sec-WebSocket-Accept".into());
    }
    ws.taken = head_end;
    write_frame(&mut ws.stream, OP_TEXT, join.as_bytes()).await?;
    loop {
        while let Some(text) = ws.next_text().await? {
            let frame = &ws.buffer[text];
            if frame.starts_with(b"{\"reply\":1,") {
                if memchr::memmem::find(frame, b"\"ok\"").is_some() {
                    return Ok(ws);
                }
                let frame = String::from_utf8_lossy(frame);
                return Err(format!("join refused: {frame:.120}"));
            }
        }
        ws.read().await?;
    }
}

/// A `--joins` subscriber: counts every delivery and records its latency (wall clock now
/// minus the event's `"sent"`), for the subscribers `--latency-every` picks. The clock is
/// read once per socket read: the frames of one read arrived together.
async fn watcher(
    args: Arc<Args>,
    shared: Arc<Shared>,
    watch: Arc<Watch>,
    connect: Arc<Semaphore>,
    index: usize,
) {
    let store = index.is_multiple_of(args.latency_every.max(1)).then(|| {
        let store = Arc::new(Mutex::new(Samples::default()));
        watch.stores.lock().unwrap().push(store.clone());
        store
    });
    let lines = args.joins.as_ref().expect("--joins");
    let attempt = connect_raw(&args, index, &lines[index % lines.len()]);
    let Some(mut ws) = connect_counted(&shared, &connect, index, attempt).await else {
        return;
    };
    let sent_key = memchr::memmem::Finder::new("\"sent\":");
    // This read's samples, stored (under the store's lock) once per read.
    let mut batch = Samples::default();
    let mut now = epoch_seconds();
    loop {
        let mut deliveries = 0u64;
        let ended = loop {
            let text = match ws.next_text().await {
                Ok(Some(text)) => text,
                Ok(None) => break None,
                Err(e) => break Some(e),
            };
            let frame = &ws.buffer[text];
            if !frame.starts_with(b"{\"push\":\"pub\"") {
                continue;
            }
            deliveries += 1;
            let Some(sent) = float_after(frame, &sent_key) else {
                let frame = String::from_utf8_lossy(frame);
                shared.error(format!(
                    "subscriber {index}: delivery without a \"sent\" number: {frame:.160}"
                ));
                continue;
            };
            if store.is_some() {
                // `as` saturates: a negative latency (clock step) is 0.
                batch.latency_us.push(((now - sent) * 1e6) as u32);
                batch.sent.push(sent);
            }
        };
        // Samples first, so the report (woken by the count) finds them.
        if let Some(store) = &store {
            let n = batch.sent.len();
            if n > 0 {
                let before = watch.recorded.fetch_add(n, Ordering::Relaxed);
                let keep = MAX_SAMPLES.saturating_sub(before).min(n);
                if keep > 0 {
                    let mut samples = store.lock().unwrap();
                    samples
                        .latency_us
                        .extend_from_slice(&batch.latency_us[..keep]);
                    samples.sent.extend_from_slice(&batch.sent[..keep]);
                }
                batch.latency_us.clear();
                batch.sent.clear();
            }
        }
        if deliveries > 0 {
            let delivered = watch.delivered.fetch_add(deliveries, Ordering::AcqRel) + deliveries;
            if delivered >= watch.expected.load(Ordering::Acquire) {
                watch.reached.notify_one();
            }
        }
        if let Some(e) = ended {
            shared.error(format!("subscriber {index}: {e}"));
            return;
        }
        if let Err(e) = ws.read().await {
            shared.error(format!("subscriber {index}: {e}"));
            return;
        }
        now = epoch_seconds();
    }
}

/// The `--joins` run after every subscriber joined: reads the stdin line, waits for the
/// deliveries it expects (or its drain time), and reports.
async fn watch_report(shared: &Shared, watch: &Watch) -> Value {
    let mut line = String::new();
    let mut stdin = BufReader::new(tokio::io::stdin());
    if let Err(e) = stdin.read_line(&mut line).await {
        shared.error(format!("stdin: {e}"));
    }
    let waited = Instant::now();
    let request: Value = serde_json::from_str(line.trim()).unwrap_or(Value::Null);
    let (Some(from), Some(expected), Some(drain)) = (
        request["from"].as_f64(),
        request["expected"].as_u64(),
        request["drain"]
            .as_f64()
            .filter(|d| d.is_finite() && *d >= 0.0),
    ) else {
        shared.error(format!(
            "stdin: expected {{\"from\":..,\"expected\":..,\"drain\":..}}, got {:.120}",
            line.trim()
        ));
        return json!({"delivered": watch.delivered.load(Ordering::Acquire)});
    };
    watch.expected.store(expected, Ordering::Release);
    let _ = tokio::time::timeout(Duration::from_secs_f64(drain), async {
        loop {
            let reached = watch.reached.notified();
            if watch.delivered.load(Ordering::Acquire) >= expected {
                break;
            }
            reached.await;
        }
    })
    .await;
    let seconds = waited.elapsed().as_secs_f64();
    let delivered = watch.delivered.load(Ordering::Acquire);
    let mut latencies = Vec::new();
    for store in watch.stores.lock().unwrap().iter() {
        let samples = store.lock().unwrap();
        latencies.extend(
            samples
                .latency_us
                .iter()
                .zip(&samples.sent)
                .filter(|(_, sent)| **sent >= from)
                .map(|(latency, _)| *latency),
        );
    }
    let recorded = watch.recorded.load(Ordering::Relaxed);
    json!({
        "delivered": delivered,
        "expected": expected,
        "seconds": seconds,
        "timed_out": delivered < expected,
        "from": from,
        "samples": latencies.len(),
        "samples_dropped": recorded.saturating_sub(MAX_SAMPLES),
        "latency_ms": percentiles(latencies),
    })
}

/// One message for the publisher: the window permit was already taken.
struct Outgoing {
    seq: u64,
    channel: usize,
    data: String,
}

fn message_data(shared: &Shared, seq: u64, size: usize) -> String {
    let head = format!("{{\"t\":{},\"s\":{seq}", shared.now_ns());
    let fixed = head.len() + ",\"p\":\"\"}".len();
    let pad = size.saturating_sub(fixed);
    let mut data = String::with_capacity(fixed + pad);
    data.push_str(&head);
    data.push_str(",\"p\":\"");
    data.extend(std::iter::repeat_n('x', pad));
    data.push_str("\"}");
    data
}

/// Starts the publisher; returns where to send messages. The window gets a permit back per
/// acknowledged (accepted) message.
async fn start_publisher(
    args: Arc<Args>,
    shared: Arc<Shared>,
    window: Arc<Semaphore>,
) -> Result<mpsc::UnboundedSender<Outgoing>, String> {
    let (tx, rx) = mpsc::unbounded_channel::<Outgoing>();
    match args.publisher {
        Publisher::Ws => {
            let ws = if args.target == Target::Pyrt {
                open_ws(args.port, "/connection/websocket", 0, false).await?
            } else {
                let path = "/socket.io/?EIO=4&transport=websocket";
                let mut ws = open_ws(args.port, path, 0, false).await?;
                socketio_connect(&mut ws).await?;
                ws
            };
            let (mut sink, mut stream) = ws.split();
            let (frames_tx, mut frames_rx) = mpsc::unbounded_channel::<String>();
            let target = args.target;
            let prefix = args.prefix.clone();
            let formatter_frames = frames_tx.clone();
            let mut rx = rx;
            tokio::spawn(async move {
                while let Some(out) = rx.recv().await {
                    let channel = channel_name(&prefix, out.channel);
                    let id = out.seq + 1;
                    let frame = match target {
                        Target::Pyrt => format!(
                            "{{\"cmd\":\"publish\",\"id\":{id},\"channel\":\"{channel}\",\"ack\":true,\"data\":{}}}",
                            out.data
                        ),
                        _ => format!(
                            "42{id}[\"publish\",{{\"channel\":\"{channel}\",\"data\":{}}}]",
                            out.data
                        ),
                    };
                    if formatter_frames.send(frame).is_err() {
                        break;
                    }
                }
            });
            let writer_shared = shared.clone();
            tokio::spawn(async move {
                while let Some(frame) = frames_rx.recv().await {
                    if let Err(e) = sink.send(Message::text(frame)).await {
                        writer_shared.error(format!("publisher: write: {e}"));
                        break;
                    }
                }
            });
            tokio::spawn(async move {
                while let Some(message) = stream.next().await {
                    let text = match message {
                        Ok(Message::Text(text)) => text,
                        Ok(Message::Close(frame)) => {
                            shared.error(format!("publisher: closed by the server: {frame:?}"));
                            break;
                        }
                        Ok(_) => continue,
                        Err(e) => {
                            shared.error(format!("publisher: {e}"));
                            break;
                        }
                    };
                    let frame = text.as_str();
                    match target {
                        Target::Pyrt if frame.starts_with("{\"reply\":") => {
                            if !frame.contains("\"ok\"") {
                                shared.error(format!("publish refused: {frame:.120}"));
                            }
                            window.add_permits(1);
                        }
                        Target::Pyrt if frame.starts_with("{\"push\":\"ping\"") => {
                            let _ = frames_tx.send("{\"cmd\":\"ping\"}".into());
                        }
                        Target::Socketio if frame.starts_with("43") => window.add_permits(1),
                        Target::Socketio if frame == "2" => {
                            let _ = frames_tx.send("3".into());
                        }
                        _ => {}
                    }
                }
            });
        }
        Publisher::Http => {
            // W keep-alive connections, each taking the next message when its previous
            // request was answered: W requests in flight, as the WebSocket publishers have W
            // publishes awaiting their acknowledgement.
            let rx = Arc::new(tokio::sync::Mutex::new(rx));
            for _ in 0..args.window.max(1) {
                let rx = rx.clone();
                let shared = shared.clone();
                let window = window.clone();
                let args = args.clone();
                let port = args.port;
                let name = args.target.name();
                tokio::spawn(async move {
                    let mut conn: Option<TcpStream> = None;
                    let mut buffer = Vec::with_capacity(4096);
                    loop {
                        let next = rx.lock().await.recv().await;
                        let Some(out) = next else { break };
                        let request = publish_request(&args, &out);
                        // A keep-alive connection the server closed (after its request limit)
                        // fails the first attempt; the second one is on a fresh connection.
                        let mut result = Err(String::new());
                        for _attempt in 0..2 {
                            let reused = conn.is_some();
                            result = http_post(&mut conn, port, &request, &mut buffer).await;
                            if result.is_ok() || !reused {
                                break;
                            }
                        }
                        match result {
                            Ok(status) if (200..300).contains(&status) => {}
                            Ok(status) => shared.error(format!("{name} publish: HTTP {status}")),
                            Err(e) => shared.error(format!("{name} publish: {e}")),
                        }
                        window.add_permits(1);
                    }
                });
            }
        }
    }
    Ok(tx)
}

/// The HTTP request that publishes `out`: Nchan's `POST /pub/<channel>` with the data as the
/// body, or pyrt's `POST /api/publish` with `{"channel", "data"}` and the API key.
fn publish_request(args: &Args, out: &Outgoing) -> String {
    let channel = channel_name(&args.prefix, out.channel);
    let (path, auth, body) = match args.target {
        Target::Pyrt => {
            let key = args.api_key.as_deref().unwrap_or_default();
            let body = format!("{{\"channel\":\"{channel}\",\"data\":{}}}", out.data);
            (
                "/api/publish".to_string(),
                format!("Authorization: Bearer {key}\r\n"),
                body,
            )
        }
        _ => (format!("/pub/{channel}"), String::new(), out.data.clone()),
    };
    format!(
        "POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n{auth}Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )
}

/// Sends one request on `conn` (connecting first if there is none); returns the status.
/// On any error the connection is dropped.
async fn http_post(
    conn: &mut Option<TcpStream>,
    port: u16,
    request: &str,
    buffer: &mut Vec<u8>,
) -> Result<u16, String> {
    if conn.is_none() {
        let stream = TcpStream::connect((Ipv4Addr::LOCALHOST, port))
            .await
            .map_err(|e| format!("connect: {e}"))?;
        stream
            .set_nodelay(true)
            .map_err(|e| format!("nodelay: {e}"))?;
        buffer.clear();
        *conn = Some(stream);
    }
    let stream = conn.as_mut().expect("connected above");
    let result = async {
        stream
            .write_all(request.as_bytes())
            .await
            .map_err(|e| e.to_string())?;
        read_http_response(stream, buffer).await
    }
    .await;
    if result.is_err() {
        *conn = None;
    }
    result
}

/// Reads one HTTP/1.1 response with a Content-Length body; returns its status.
async fn read_http_response(conn: &mut TcpStream, buffer: &mut Vec<u8>) -> Result<u16, String> {
    loop {
        if let Some(end) = buffer.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&buffer[..end]).to_string();
            let status: u16 = head
                .split_whitespace()
                .nth(1)
                .and_then(|s| s.parse().ok())
                .ok_or_else(|| format!("bad status line: {head:.60}"))?;
            let length = head
                .lines()
                .find_map(|l| {
                    let (name, value) = l.split_once(':')?;
                    name.eq_ignore_ascii_case("content-length")
                        .then(|| value.trim().parse::<usize>().ok())
                        .flatten()
                })
                .ok_or("response without content-length")?;
            let total = end + 4 + length;
            while buffer.len() < total {
                read_more(conn, buffer).await?;
            }
            buffer.drain(..total);
            return Ok(status);
        }
        read_more(conn, buffer).await?;
    }
}

async fn read_more(conn: &mut TcpStream, buffer: &mut Vec<u8>) -> Result<(), String> {
    let mut chunk = [0u8; 4096];
    let n = conn.read(&mut chunk).await.map_err(|e| e.to_string())?;
    if n == 0 {
        return Err("connection closed".into());
    }
    buffer.extend_from_slice(&chunk[..n]);
    Ok(())
}

fn percentiles(mut samples: Vec<u32>) -> Value {
    if samples.is_empty() {
        return json!(null);
    }
    samples.sort_unstable();
    let at = |q: f64| {
        let rank = ((q * samples.len() as f64).ceil() as usize).clamp(1, samples.len());
        samples[rank - 1] as f64 / 1000.0
    };
    json!({
        "p50": at(0.50), "p90": at(0.90), "p99": at(0.99), "p99.9": at(0.999),
        "max": *samples.last().unwrap() as f64 / 1000.0,
        "samples": samples.len(),
    })
}

/// Messages per channel for sequence numbers [from, to).
fn per_channel(from: u64, to: u64, channels: usize) -> Vec<u64> {
    let mut counts = vec![0u64; channels];
    for seq in from..to {
        counts[(seq % channels as u64) as usize] += 1;
    }
    counts
}

/// Sends messages [from, to): as fast as the window allows, or paced at `rate` per second.
async fn drive(
    shared: &Shared,
    args: &Args,
    tx: &mpsc::UnboundedSender<Outgoing>,
    window: &Semaphore,
    from: u64,
    to: u64,
    rate: Option<f64>,
) -> Result<(), String> {
    let start = Instant::now();
    for seq in from..to {
        if let Some(rate) = rate {
            let due = start + Duration::from_secs_f64((seq - from) as f64 / rate);
            tokio::time::sleep_until(due.into()).await;
        }
        window.acquire().await.map_err(|e| e.to_string())?.forget();
        let data = message_data(shared, seq, args.size);
        let channel = (seq % args.channels as u64) as usize;
        tx.send(Outgoing { seq, channel, data })
            .map_err(|_| "publisher is gone".to_string())?;
    }
    Ok(())
}

async fn wait_phase(shared: &Shared, phase: usize, timeout: Duration) -> bool {
    let p = &shared.phases[phase];
    tokio::time::timeout(timeout, async {
        while p.pending.load(Ordering::Acquire) > 0 {
            p.done.notified().await;
        }
    })
    .await
    .is_ok()
}

fn phase_report(
    shared: &Shared,
    phase: usize,
    expected: u64,
    start_ns: u64,
    messages: u64,
    done: bool,
) -> Value {
    let p = &shared.phases[phase];
    // Cut short: the rate up to the last delivery (a server that stopped delivering is not
    // charged for the rest of the timeout; the missing deliveries are reported as such).
    let end_ns = if done {
        p.end_ns.load(Ordering::Acquire)
    } else {
        p.last_delivery_ns.load(Ordering::Relaxed).max(start_ns)
    };
    let seconds = (end_ns.saturating_sub(start_ns)) as f64 / 1e9;
    let delivered = p.delivered.load(Ordering::Relaxed);
    let latencies = std::mem::take(&mut *p.latencies_us.lock().unwrap());
    json!({
        "messages": messages,
        "expected": expected,
        "delivered": delivered,
        "seconds": seconds,
        "deliveries_per_s": if seconds > 0.0 { delivered as f64 / seconds } else { 0.0 },
        "publishes_per_s": if seconds > 0.0 { messages as f64 / seconds } else { 0.0 },
        "timed_out": !done,
        "latency_ms": percentiles(latencies),
    })
}

async fn run(args: Args) -> Value {
    let nofile = raise_nofile_limit();
    let args = Arc::new(args);
    let shared = Arc::new(Shared {
        start: Instant::now(),
        peak_messages: args.messages as u64,
        phases: [Phase::new(args.subscribers), Phase::new(args.subscribers)],
        connected: AtomicUsize::new(0),
        connect_failed: AtomicUsize::new(0),
        connect_done: Notify::new(),
        subscribers: args.subscribers,
        errors: AtomicU64::new(0),
        error_samples: Mutex::new(Vec::new()),
        expected: [Mutex::new(Vec::new()), Mutex::new(Vec::new())],
        expected_set: [AtomicBool::new(false), AtomicBool::new(false)],
        expected_ready: [Notify::new(), Notify::new()],
    });
    let timeout = Duration::from_secs_f64(args.timeout);
    let mut report = json!({
        "target": args.target.name(),
        "publisher": args.publisher.name(),
        "window": args.window,
        "subscribers": args.subscribers,
        "channels": args.channels,
        "size": args.size,
        "nofile_limit": nofile,
        "threads": args.threads,
    });

    // Connect.
    let connect = Arc::new(Semaphore::new(args.connect_concurrency.max(1)));
    let watch = Arc::new(Watch::new());
    let cpu_start = cpu_seconds();
    let connect_start = Instant::now();
    for index in 0..args.subscribers {
        if args.joins.is_some() {
            tokio::spawn(watcher(
                args.clone(),
                shared.clone(),
                watch.clone(),
                connect.clone(),
                index,
            ));
        } else {
            tokio::spawn(subscriber(
                args.clone(),
                shared.clone(),
                connect.clone(),
                index,
            ));
        }
    }
    let all_connected = tokio::time::timeout(timeout, async {
        while shared.connected.load(Ordering::Acquire)
            + shared.connect_failed.load(Ordering::Acquire)
            < args.subscribers
        {
            shared.connect_done.notified().await;
        }
    })
    .await
    .is_ok();
    let connect_seconds = connect_start.elapsed().as_secs_f64();
    let connected = shared.connected.load(Ordering::Acquire);
    let failed = shared.connect_failed.load(Ordering::Acquire);
    report["connect"] = json!({
        "connected": connected,
        "failed": failed,
        "seconds": connect_seconds,
        "per_s": connected as f64 / connect_seconds,
        "timed_out": !all_connected,
        "loadgen_cpu_s": cpu_seconds() - cpu_start,
    });
    say(json!({
        "phase": "connected",
        "connected": connected,
        "failed": failed,
        "seconds": connect_seconds,
        "timed_out": !all_connected,
    }));

    if args.joins.is_some() {
        if all_connected {
            if let Value::Object(fields) = watch_report(&shared, &watch).await {
                report.as_object_mut().expect("an object").extend(fields);
            }
        }
    } else if args.idle {
        report["loadgen_rss_kib"] = json!(rss_kib());
        let mut line = String::new();
        let mut stdin = BufReader::new(tokio::io::stdin());
        let _ = tokio::time::timeout(timeout, stdin.read_line(&mut line)).await;
    } else if all_connected {
        let window = Arc::new(Semaphore::new(args.window.max(1)));
        match start_publisher(args.clone(), shared.clone(), window.clone()).await {
            Err(e) => shared.error(format!("publisher: {e}")),
            Ok(tx) => {
                // Peak: as fast as the server accepts.
                let m = args.messages as u64;
                let counts = per_channel(0, m, args.channels);
                let expected_peak: u64 = (0..args.subscribers)
                    .map(|i| counts[i % args.channels])
                    .sum();
                shared.set_expected(0, counts);
                say(json!({"phase": "peak_start"}));
                let cpu0 = cpu_seconds();
                let start_ns = shared.now_ns();
                let sent = drive(&shared, &args, &tx, &window, 0, m, None).await;
                if let Err(e) = sent {
                    shared.error(format!("publish: {e}"));
                }
                let done = wait_phase(&shared, 0, timeout).await;
                let mut peak = phase_report(&shared, 0, expected_peak, start_ns, m, done);
                peak["loadgen_cpu_s"] = json!(cpu_seconds() - cpu0);
                say(json!({"phase": "peak_end"}));
                let peak_rate = peak["publishes_per_s"].as_f64().unwrap_or(0.0);
                report["peak"] = peak;

                // Paced: latency at a fraction of the peak rate.
                let rate = args.paced_rate.unwrap_or(args.paced_fraction * peak_rate);
                if done && rate > 0.0 {
                    let count = ((rate * args.paced_seconds).ceil() as u64).max(20);
                    let counts = per_channel(m, m + count, args.channels);
                    let expected: u64 = (0..args.subscribers)
                        .map(|i| counts[i % args.channels])
                        .sum();
                    shared.set_expected(1, counts);
                    // Wait for every window permit, so the paced phase starts from quiet.
                    let _ = window.acquire_many(args.window.max(1) as u32).await;
                    say(json!({"phase": "paced_start"}));
                    let cpu0 = cpu_seconds();
                    let start_ns = shared.now_ns();
                    if let Err(e) =
                        drive(&shared, &args, &tx, &window, m, m + count, Some(rate)).await
                    {
                        shared.error(format!("publish: {e}"));
                    }
                    let done = wait_phase(&shared, 1, timeout).await;
                    let mut paced = phase_report(&shared, 1, expected, start_ns, count, done);
                    paced["rate"] = json!(rate);
                    paced["loadgen_cpu_s"] = json!(cpu_seconds() - cpu0);
                    say(json!({"phase": "paced_end"}));
                    report["paced"] = paced;
                }
            }
        }
    }
    report["loadgen_rss_kib"] = report
        .get("loadgen_rss_kib")
        .cloned()
        .unwrap_or(json!(rss_kib()));
    report["errors"] = json!(shared.errors.load(Ordering::Relaxed));
    report["error_samples"] = json!(*shared.error_samples.lock().unwrap());
    report["loadgen_cpu_s"] = json!(cpu_seconds() - cpu_start);
    report
}

fn main() {
    let args = match Args::parse(std::env::args().skip(1)) {
        Ok(args) => args,
        Err(message) => {
            if !message.is_empty() {
                eprintln!("pyrt-loadgen: {message}");
            }
            eprint!("{USAGE}");
            std::process::exit(if message.is_empty() { 0 } else { 2 });
        }
    };
    let runtime = if args.threads <= 1 {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
    } else {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(args.threads)
            .enable_all()
            .build()
    }
    .expect("tokio runtime");
    let report = runtime.block_on(run(args));
    say(report);
    // Connections are torn down by the exit; no need to close 50k sockets one by one.
    std::process::exit(0);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn server_frame(opcode: u8, payload: &[u8]) -> Vec<u8> {
        let mut frame = vec![0x80 | opcode];
        match payload.len() {
            len @ 0..=125 => frame.push(len as u8),
            len @ 126..=0xffff => {
                frame.push(126);
                frame.extend_from_slice(&(len as u16).to_be_bytes());
            }
            len => {
                frame.push(127);
                frame.extend_from_slice(&(len as u64).to_be_bytes());
            }
        }
        frame.extend_from_slice(payload);
        frame
    }

    #[test]
    fn parses_each_length_form_and_waits_for_the_rest() {
        for len in [0, 5, 125, 126, 300, 0xffff, 0x10000, 70_000] {
            let payload = vec![b'x'; len];
            let frame = server_frame(OP_TEXT, &payload);
            let head = parse_frame(&frame).unwrap().unwrap();
            assert!(head.fin);
            assert_eq!(head.opcode, OP_TEXT);
            assert_eq!(head.payload.end, frame.len());
            assert_eq!(&frame[head.payload], &payload[..]);
            for cut in [0, 1, 2, 3, 9, frame.len() - 1] {
                if cut < frame.len() {
                    assert!(parse_frame(&frame[..cut]).unwrap().is_none(), "{len} {cut}");
                }
            }
        }
        assert!(parse_frame(&[0x81, 0x85, 0, 0, 0, 0, 1, 2, 3, 4, 5]).is_err());
    }

    fn parse(argv: &[&str]) -> Result<Args, String> {
        Args::parse(argv.iter().map(|a| a.to_string()))
    }

    #[test]
    fn publishes_to_pyrt_over_http_with_the_key() {
        let args = parse(&[
            "--target",
            "pyrt",
            "--port",
            "1",
            "--publisher",
            "http",
            "--api-key",
            "k3y",
        ])
        .unwrap();
        assert_eq!(args.publisher, Publisher::Http);
        let out = Outgoing {
            seq: 0,
            channel: 2,
            data: r#"{"t":1}"#.into(),
        };
        let request = publish_request(&args, &out);
        let body = r#"{"channel":"benchc2","data":{"t":1}}"#;
        assert!(
            request.starts_with("POST /api/publish HTTP/1.1\r\n"),
            "{request}"
        );
        assert!(
            request.contains("\r\nAuthorization: Bearer k3y\r\n"),
            "{request}"
        );
        assert!(request.contains(&format!("\r\nContent-Length: {}\r\n", body.len())));
        assert!(request.ends_with(&format!("\r\n\r\n{body}")), "{request}");
        let body_json: Value = serde_json::from_str(body).unwrap();
        assert_eq!(body_json["data"]["t"], 1);

        let nchan = parse(&["--target", "nchan", "--port", "1"]).unwrap();
        assert_eq!(nchan.publisher, Publisher::Http);
        let request = publish_request(&nchan, &out);
        assert!(
            request.starts_with("POST /pub/benchc2 HTTP/1.1\r\n"),
            "{request}"
        );
        assert!(!request.contains("Authorization"));
        assert!(request.ends_with("\r\n\r\n{\"t\":1}"), "{request}");
    }

    #[test]
    fn chooses_publishers_per_target() {
        assert_eq!(
            parse(&["--target", "pyrt", "--port", "1"])
                .unwrap()
                .publisher,
            Publisher::Ws
        );
        let no_key = parse(&["--target", "pyrt", "--port", "1", "--publisher", "http"]);
        assert!(no_key.unwrap_err().contains("--api-key"));
        assert!(parse(&["--target", "nchan", "--port", "1", "--publisher", "ws"]).is_err());
        assert!(parse(&["--target", "socketio", "--port", "1", "--publisher", "http"]).is_err());
        let bad = parse(&["--target", "pyrt", "--port", "1", "--api-key", "a b"]);
        assert!(bad.is_err());
    }

    #[test]
    fn finds_sent() {
        let key = memchr::memmem::Finder::new("\"sent\":");
        let frame = br#"{"push":"pub","data":{"sent": 1712345678.125,"b":1}}"#;
        assert_eq!(float_after(frame, &key), Some(1712345678.125));
        assert_eq!(float_after(br#"{"sent":"x"}"#, &key), None);
    }
}
