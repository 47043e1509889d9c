use clap::Parser;
use gateway::config::Config;
use tracing_subscriber::EnvFilter;

// Pingora's throughput depends on the allocator; see the performance table in the README.
#[cfg(feature = "mimalloc")]
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// mimalloc returns freed pages to the system only when a later free comes due after its purge
/// delay, so a process that goes quiet after a burst (loading a million-sandbox table) keeps
/// the burst's garbage resident: about 350 MB of RSS at a million sandboxes, off and on. With no
/// delay freed pages go back at once, at no measured cost to throughput (`make bench`). The
/// allocator reads its options from the environment before `main`, so the gateway starts itself
/// again with the option set, unless the operator set it.
#[cfg(feature = "mimalloc")]
fn allocator_options() {
    use std::os::unix::process::CommandExt;
    const PURGE_DELAY: &str = "MIMALLOC_PURGE_DELAY";
    if std::env::var_os(PURGE_DELAY).is_some() {
        return;
    }
    let mut args = std::env::args_os();
    let arg0 = args.next().unwrap_or_default();
    let error = std::process::Command::new("/proc/self/exe")
        .arg0(arg0)
        .args(args)
        .env(PURGE_DELAY, "0")
        .exec();
    // Only reached when the exec failed: run with the allocator's defaults.
    eprintln!("sandbox-gateway: cannot set {PURGE_DELAY}: {error}");
}

fn main() {
    #[cfg(feature = "mimalloc")]
    allocator_options();
    let config = Config::parse_from(sandbox_api::cli::normalize(std::env::args()));
    let level = match config.tracing_level() {
        Ok(level) => level,
        Err(e) => {
            eprintln!("sandbox-gateway: {e}");
            std::process::exit(2);
        }
    };
    let access = if config.access_log { "info" } else { "off" };
    // Pingora's proxy logs every connection that fails before its request header (a slow or
    // hostile client) at error level: an attacker would flood the log, which is lossless and so
    // would slow requests. Those show as `sandbox_gateway_header_timeouts_total` instead; request
    // failures are in the access log. Debug and trace show them.
    let proxy = if matches!(level, "debug" | "trace") {
        level
    } else {
        "off"
    };
    let filter = EnvFilter::new(format!(
        "{level},pingora=warn,pingora_proxy={proxy},access={access}"
    ));
    // Lossless: under overload the request path waits for the log thread rather than dropping
    // access-log lines. The guard flushes the buffer at exit. The log thread writes through a
    // buffer it flushes whenever it has caught up, so a busy gateway writes many lines per
    // system call (stdout alone would make one per line) and an idle one writes at once.
    let (writer, guard) = tracing_appender::non_blocking::NonBlockingBuilder::default()
        .lossy(false)
        .buffered_lines_limit(64 * 1024)
        .finish(std::io::BufWriter::with_capacity(
            64 * 1024,
            std::io::stdout(),
        ));
    tracing_subscriber::fmt()
        .json()
        .flatten_event(true)
        .with_current_span(false)
        .with_env_filter(filter)
        .with_writer(writer)
        .init();
    gateway::drain::on_exit(move || drop(guard));
    if let Err(e) = gateway::server::run(config) {
        eprintln!("sandbox-gateway: {e}");
        gateway::drain::exit(2);
    }
    gateway::drain::exit(0);
}
