//! A deterministic simulation of the pipeline (issue 34): the real
//! `Pipeline` and outbox relay on an in-memory broker and store
//! (`broker.rs`, `store.rs`), driven by one seed through tokio's paused clock
//! (`sim.rs`), with crashes, dropped sessions, lost commit results, nacks,
//! delayed confirms, callers' retries, two or three workers, and tokens
//! revoked and profiles disabled between any two steps (`run.rs`). After
//! each run: every command answered; a 200 is always the stored answer; each
//! row written once; each event published, always as the same message, and
//! none without its row; no command created on a token or profile after its
//! revocation; the email cooldown kept; nothing acked before its effects are
//! durable; everything drained once the faults stop.
//!
//!   cargo test --test simulation                       # CI's seeds
//!   cargo test --test simulation -- --seeds 100000     # as long as you like
//!   cargo test --test simulation -- --seed 1234 -v     # replay one, with its journal
//!   cargo test --test simulation -- --bug known-rows-unchecked   # show it finds a bug
//!
//! A failing seed prints the command that replays it.

mod broker;
mod run;
mod sim;
mod store;

use profile_worker::pipeline::bugs::Bug;
use std::process::ExitCode;
use std::time::Instant;

/// Seeds CI runs (about a minute on the 2-core machines, with the bugs' hunts).
const CI_SEEDS: u64 = 2_000;

struct Args {
    first: u64,
    seeds: u64,
    bug: Option<Bug>,
    verbose: bool,
    /// Each bug in turn, each until a seed finds it (CI's proof the invariants bite).
    hunt: bool,
}

fn args() -> Result<Args, String> {
    let mut a = Args {
        first: 1,
        seeds: CI_SEEDS,
        bug: None,
        verbose: false,
        hunt: true,
    };
    let mut it = std::env::args().skip(1);
    let mut explicit = false;
    while let Some(arg) = it.next() {
        let mut value = |name: &str| it.next().ok_or(format!("{name} needs a value"));
        match arg.as_str() {
            "--seeds" => {
                a.seeds = value("--seeds")?
                    .parse()
                    .map_err(|e| format!("--seeds: {e}"))?;
                explicit = true;
            }
            "--seed" => {
                a.first = value("--seed")?
                    .parse()
                    .map_err(|e| format!("--seed: {e}"))?;
                a.seeds = 1;
                explicit = true;
            }
            "--from" => {
                a.first = value("--from")?
                    .parse()
                    .map_err(|e| format!("--from: {e}"))?
            }
            "--bug" => {
                let name = value("--bug")?;
                a.bug = Some(Bug::parse(&name).ok_or(format!(
                    "--bug {name}: one of {:?}",
                    Bug::ALL.map(Bug::as_str)
                ))?);
                explicit = true;
            }
            "-v" | "--verbose" => a.verbose = true,
            // cargo test's own flags, passed to every test binary.
            "--nocapture" | "--quiet" | "-q" | "--test-threads" | "--color" => {}
            other if other.starts_with("--") => return Err(format!("unknown flag {other}")),
            // A test-name filter (cargo test NAME): run only if it names this.
            filter => {
                if !"simulation".contains(filter) {
                    a.seeds = 0;
                    a.hunt = false;
                    explicit = true;
                }
            }
        }
    }
    if explicit {
        a.hunt = false;
    }
    Ok(a)
}

fn replay(seed: u64, bug: Option<Bug>) -> String {
    let bug = bug.map_or(String::new(), |b| format!(" --bug {}", b.as_str()));
    format!("cargo test --test simulation -- --seed {seed}{bug} -v")
}

fn main() -> ExitCode {
    let a = match args() {
        Ok(a) => a,
        Err(e) => {
            eprintln!("simulation: {e}");
            return ExitCode::from(2);
        }
    };
    let started = Instant::now();
    let mut failed = 0u64;
    for seed in a.first..a.first + a.seeds {
        let out = run::run(seed, a.bug);
        if a.verbose {
            for line in &out.journal {
                println!("{line}");
            }
            println!("seed {seed}: {}", out.summary);
        }
        if !out.violations.is_empty() {
            failed += 1;
            if a.bug.is_some() {
                println!(
                    "seed {seed} found {}: {}",
                    a.bug.map(Bug::as_str).unwrap_or_default(),
                    out.violations[0]
                );
                break;
            }
            println!("seed {seed} FAILED: {}", out.summary);
            for v in out.violations.iter().take(5) {
                println!("  {v}");
            }
            println!("  replay: {}", replay(seed, a.bug));
        }
    }
    let seeds_run = a.seeds;
    match a.bug {
        None => println!(
            "simulation: {seeds_run} seeds from {} in {:.1} s, {failed} failed",
            a.first,
            started.elapsed().as_secs_f64()
        ),
        Some(b) if failed == 0 => {
            println!("simulation: {seeds_run} seeds did not find {}", b.as_str());
            return ExitCode::FAILURE;
        }
        Some(_) => {}
    }
    if failed > 0 && a.bug.is_none() {
        return ExitCode::FAILURE;
    }
    // The same seed, the same run: twice, compared.
    if a.bug.is_none() && a.seeds > 1 {
        for seed in a.first..a.first + 3 {
            let (x, y) = (run::run(seed, None), run::run(seed, None));
            if x.digest != y.digest {
                let at = x
                    .journal
                    .iter()
                    .zip(&y.journal)
                    .position(|(p, q)| p != q)
                    .unwrap_or(x.journal.len().min(y.journal.len()));
                println!(
                    "seed {seed} is not deterministic: the runs part at journal line {at}: {:?} / {:?}",
                    x.journal.get(at),
                    y.journal.get(at)
                );
                return ExitCode::FAILURE;
            }
        }
        println!(
            "simulation: seeds {}..{} ran twice, identically",
            a.first,
            a.first + 3
        );
    }
    if a.hunt {
        for bug in Bug::ALL {
            let hunting = Instant::now();
            let found =
                (1..=CI_SEEDS).find(|&seed| !run::run(seed, Some(bug)).violations.is_empty());
            match found {
                Some(seed) => println!(
                    "simulation: {} found by seed {seed} ({} seeds, {:.1} s); replay: {}",
                    bug.as_str(),
                    seed,
                    hunting.elapsed().as_secs_f64(),
                    replay(seed, Some(bug))
                ),
                None => {
                    println!("simulation: {} NOT found in {CI_SEEDS} seeds", bug.as_str());
                    return ExitCode::FAILURE;
                }
            }
        }
    }
    ExitCode::SUCCESS
}
