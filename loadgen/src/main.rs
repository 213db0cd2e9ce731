//! The `loadgen` binary: see `loadgen --help` and the crate documentation.

use std::sync::atomic::AtomicBool;
use std::sync::Arc;

use anyhow::Result;
use clap::Parser;

fn main() -> Result<()> {
    let args = loadgen::cli::Args::parse();
    let plan = args.plan()?;
    let interrupt = Arc::new(AtomicBool::new(false));
    for sig in [signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM] {
        // A second Ctrl-C while releasing exits at once.
        signal_hook::flag::register_conditional_shutdown(sig, 130, interrupt.clone())?;
        signal_hook::flag::register(sig, interrupt.clone())?;
    }
    let command = std::env::args().collect::<Vec<_>>().join(" ");
    let report = loadgen::run(plan, command, interrupt, args.quiet)?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print!("{}", report.table());
    }
    Ok(())
}
