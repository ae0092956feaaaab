//! A mock OpenAI-compatible chat-completions server (see
//! `tests/support/mock_openai.rs`), for benchmarks and manual use.
//!
//! ```sh
//! cargo run --release --example mock_openai -- --latency-ms 50 [--port 0] \
//!     [--print-url-to FILE] [--require-key KEY]
//! ```
//!
//! Prints the base URL (`http://127.0.0.1:PORT/v1`) on stdout, and to FILE if
//! given (written to a temporary name, then renamed, so a reader never sees
//! half of it). Runs until SIGINT or SIGTERM, then prints the number of
//! requests served to stderr:
//! `mock_openai: served N requests (A answered 200)`.

#[allow(dead_code)]
#[path = "../tests/support/mock_openai.rs"]
mod mock_openai;

use std::path::PathBuf;
use std::process::ExitCode;

const USAGE: &str = "\
Usage: mock_openai [--latency-ms MS] [--port PORT] [--print-url-to FILE] [--require-key KEY]

A mock OpenAI-compatible server: POST /v1/chat/completions, GET /v1/models.

Options:
  --latency-ms MS      delay before each chat-completion reply (default: 0)
  --port PORT          port on 127.0.0.1 (default: 0, any free port)
  --print-url-to FILE  also write the base URL to FILE
  --require-key KEY    answer 401 unless 'Authorization: Bearer KEY'
  -h, --help           show this help

Runs until SIGINT/SIGTERM; then prints the request count to stderr.";

struct Args {
    latency_ms: u64,
    port: u16,
    url_file: Option<PathBuf>,
    require_key: Option<String>,
}

fn parse_args() -> Result<Args, String> {
    let mut args = Args {
        latency_ms: 0,
        port: 0,
        url_file: None,
        require_key: None,
    };
    let mut it = std::env::args().skip(1);
    while let Some(arg) = it.next() {
        let (name, inline) = match arg.split_once('=') {
            Some((n, v)) if n.starts_with("--") => (n.to_owned(), Some(v.to_owned())),
            _ => (arg.clone(), None),
        };
        if name == "-h" || name == "--help" {
            println!("{USAGE}");
            std::process::exit(0);
        }
        let mut value = || {
            inline
                .clone()
                .or_else(|| it.next())
                .ok_or_else(|| format!("{name} needs a value"))
        };
        match name.as_str() {
            "--latency-ms" => {
                let v = value()?;
                args.latency_ms = v
                    .parse()
                    .map_err(|_| format!("--latency-ms: not a number of milliseconds: {v}"))?;
            }
            "--port" => {
                let v = value()?;
                args.port = v.parse().map_err(|_| format!("--port: not a port: {v}"))?;
            }
            "--print-url-to" => args.url_file = Some(PathBuf::from(value()?)),
            "--require-key" => args.require_key = Some(value()?),
            _ => return Err(format!("unknown argument: {arg}")),
        }
    }
    Ok(args)
}

fn write_url(path: &PathBuf, url: &str) -> std::io::Result<()> {
    let mut tmp = path.clone().into_os_string();
    tmp.push(".tmp");
    std::fs::write(&tmp, format!("{url}\n"))?;
    std::fs::rename(&tmp, path)
}

/// SIGINT and SIGTERM, caught from the moment this is made (so a signal
/// sent right after the URL is printed is not lost).
struct Signals {
    rt: tokio::runtime::Runtime,
    #[cfg(unix)]
    streams: (tokio::signal::unix::Signal, tokio::signal::unix::Signal),
}

impl Signals {
    fn new() -> std::io::Result<Signals> {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        #[cfg(unix)]
        let streams = {
            use tokio::signal::unix::{SignalKind, signal};
            let _guard = rt.enter();
            (
                signal(SignalKind::interrupt())?,
                signal(SignalKind::terminate())?,
            )
        };
        Ok(Signals {
            rt,
            #[cfg(unix)]
            streams,
        })
    }

    /// Blocks until one arrives.
    fn wait(mut self) -> std::io::Result<()> {
        #[cfg(unix)]
        {
            let (int, term) = &mut self.streams;
            self.rt.block_on(async {
                tokio::select! {
                    _ = int.recv() => {}
                    _ = term.recv() => {}
                }
            });
            Ok(())
        }
        #[cfg(not(unix))]
        {
            self.rt.block_on(tokio::signal::ctrl_c())
        }
    }
}

fn main() -> ExitCode {
    let args = match parse_args() {
        Ok(a) => a,
        Err(e) => {
            eprintln!("mock_openai: {e}\n\n{USAGE}");
            return ExitCode::from(2);
        }
    };
    let config = mock_openai::Config {
        latency_ms: args.latency_ms,
        require_key: args.require_key,
        ..Default::default()
    };
    let signals = match Signals::new() {
        Ok(s) => s,
        Err(e) => {
            eprintln!("mock_openai: cannot install signal handlers: {e}");
            return ExitCode::FAILURE;
        }
    };
    let server = match mock_openai::MockServer::start_on(config, args.port) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("mock_openai: cannot listen on 127.0.0.1:{}: {e}", args.port);
            return ExitCode::FAILURE;
        }
    };
    println!("{}", server.url);
    if let Some(path) = &args.url_file
        && let Err(e) = write_url(path, &server.url)
    {
        eprintln!("mock_openai: cannot write {}: {e}", path.display());
        return ExitCode::FAILURE;
    }
    let waited = signals.wait();
    eprintln!(
        "mock_openai: served {} requests ({} answered 200)",
        server.requests(),
        server.answered_total()
    );
    drop(server);
    match waited {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("mock_openai: cannot wait for signals: {e}");
            ExitCode::FAILURE
        }
    }
}
