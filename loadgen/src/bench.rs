//! One run in its own database and vhost: set up (`Setup::prepare`), start the
//! workers and the echo consumers, warm up, measure the rounds (`Measure`),
//! stop everything and check the rows.

use crate::args::BenchArgs;
use crate::checks::{check_round, check_rows, Checks, Counter};
use crate::error::{BenchError, Result};
use crate::isolation::{ceiling_email_queue, ceiling_queue, events_ceiling_queue, Isolation};
use crate::load::{Loader, Target};
use crate::meter::{batch_samples_of, stages_between, Meters};
use crate::prepared::Setup;
use crate::report::{summarize, Report, RoundRow};
use crate::setup::{self, WorkerProcess};
use crate::stats::median;
use crate::EVENTS_CEILING;
use profile_worker::broker;
use std::time::Duration;

/// The lanes benchmark (`--import`) in its database and vhost: the workers,
/// the events' consumers as production has them, then `mix::measure`.
pub async fn run_mix_isolated(
    args: &BenchArgs,
    db: &str,
    iso: &Isolation,
) -> Result<crate::mix::MixReport> {
    let s = Setup::prepare(args, db, iso).await?;
    let conn = broker::connect(s.nodes.first(), &Default::default())
        .await
        .map_err(|e| BenchError::broker("AMQP_URL", e))?;
    let workers = s.start_workers(args, db, &conn).await?;
    let channel = conn
        .create_channel()
        .await
        .map_err(|e| BenchError::broker("opening a channel", e))?;
    let (counts, mut drain) = s.start_drain(args, db, &channel).await?;
    let meters = Meters {
        broker: setup::pids_named("beam.smp"),
        db_url: s.db_url.clone(),
        echo: Vec::new(),
        drain: vec![drain.pid],
    };
    let measured = crate::mix::measure(args, &s, &workers, &meters).await;
    let _ = drain.child.kill().await;
    let _ = std::fs::remove_dir_all(&counts);
    let mut checks = Checks::default();
    stop_workers(workers, args.keep, &mut checks).await;
    let _ = conn.close(200, "bye".into()).await;
    s.store.close();
    let mut report = measured?;
    report.problems.extend(checks.problems);
    Ok(report)
}

/// Everything a run does in its database and vhost.
pub async fn run_isolated(args: &BenchArgs, db: &str, iso: &Isolation) -> Result<Report> {
    let s = Setup::prepare(args, db, iso).await?;
    let conn = broker::connect(s.nodes.first(), &Default::default())
        .await
        .map_err(|e| BenchError::broker("AMQP_URL", e))?;
    let workers = s.start_workers(args, db, &conn).await?;
    let metrics_addrs: Vec<String> = workers
        .iter()
        .filter_map(|w| setup::http_addr_in_log(&w.log))
        .collect();
    // The load channel: direct reply-to and publishes must share a channel.
    let (channel, replies) = profile_worker::client::reply_channel(&conn)
        .await
        .map_err(|e| BenchError::broker("opening the reply channel", e))?;
    let echoes = s.start_echoes(args, &channel, db).await?;
    let (counts, drain) = s.start_drain(args, db, &channel).await?;

    let (ceiling_q, events_ceiling_q) = (ceiling_queue(&s.prefix), events_ceiling_queue(&s.prefix));
    let mut m = Measure {
        args,
        targets: Targets {
            worker: Target::Worker {
                exchange: &s.names.command_exchange,
            },
            ceiling: Target::Ceiling { queue: &ceiling_q },
            events_ceiling: Target::Ceiling {
                queue: &events_ceiling_q,
            },
        },
        loader: Loader {
            channel: &channel,
            replies,
            plan: &s.plan,
            window: args.in_flight as usize,
            stall: Duration::from_secs(args.stall_secs.max(1)),
            rounds: 0,
        },
        // What the email dispatcher sees: the dispatch queue the workers
        // declared (quorum, durable, as in production), counted and purged
        // after every round.
        counter: Counter {
            channel: &channel,
            email_queue: &s.names.email_queue,
            dead_queue: &s.names.dead_letter_queue,
            counts: &counts,
            taken: Default::default(),
        },
        ceiling_email_queue: ceiling_email_queue(&s.prefix),
        meters: Meters {
            broker: setup::pids_named("beam.smp"),
            db_url: s.db_url.clone(),
            echo: echoes.iter().map(|e| e.pid).collect(),
            drain: vec![drain.pid],
        },
        workers,
        metrics_addrs,
        checks: Checks::default(),
        next_index: 0,
        rows: Vec::new(),
    };
    m.warm_up().await?;
    m.measure().await?;
    let Measure {
        workers,
        mut checks,
        rows,
        ..
    } = m;
    let peak_rss: Vec<u64> = workers
        .iter()
        .map(|w| setup::peak_rss_kib(w.pid).unwrap_or(0))
        .collect();
    for mut party in echoes.into_iter().chain([drain]) {
        // A party that died during the run failed it: its log says why.
        if let Ok(Some(status)) = party.child.try_wait() {
            checks.problems.push(format!(
                "{} exited with {status} (log: {})",
                party.log.display(),
                party.log.display()
            ));
        } else if !args.keep {
            let _ = std::fs::remove_file(&party.log);
        }
        let _ = party.child.kill().await;
    }
    let _ = std::fs::remove_dir_all(&counts);
    stop_workers(workers, args.keep, &mut checks).await;
    let _ = conn.close(200, "bye".into()).await;
    check_rows(&s.db_url, &mut checks).await?;
    s.store.close();
    Ok(summarize(args, iso, rows, peak_rss, checks))
}

async fn stop_workers(workers: Vec<WorkerProcess>, keep: bool, checks: &mut Checks) {
    for w in workers {
        let log = w.log.clone();
        match w.stop().await {
            Ok(()) if !keep => {
                let _ = std::fs::remove_file(&log);
            }
            Ok(()) => {}
            Err(e) => checks
                .problems
                .push(format!("{e} (log: {})", log.display())),
        }
    }
}

/// One load at which every target runs its rounds.
#[derive(Clone, Copy)]
struct Phase {
    /// `--load-percent`: a share of the worker's closed-loop rate.
    load_percent: Option<f64>,
    /// `--rates`: an absolute rate.
    fixed_rate: Option<f64>,
    /// Open loop at this rate; `None`: closed loop.
    rate: Option<f64>,
    n: u64,
}

struct Targets<'a> {
    worker: Target<'a>,
    ceiling: Target<'a>,
    events_ceiling: Target<'a>,
}

/// The measuring half of a run: rounds, what they cost, and what they left.
struct Measure<'a> {
    args: &'a BenchArgs,
    targets: Targets<'a>,
    loader: Loader<'a>,
    counter: Counter<'a>,
    ceiling_email_queue: String,
    meters: Meters,
    workers: Vec<WorkerProcess>,
    metrics_addrs: Vec<String>,
    checks: Checks,
    /// The worker's commands are numbered across rounds, so no two repeat.
    next_index: u64,
    rows: Vec<RoundRow>,
}

impl Measure<'_> {
    /// Commands sent to each target before measuring (checked, not reported).
    async fn warm_up(&mut self) -> Result<()> {
        let n = self.args.warmup;
        if n == 0 {
            return Ok(());
        }
        if self.args.ceiling {
            self.loader.round(&self.targets.ceiling, 0, n, None).await?;
        }
        if self.args.ceiling_events {
            let r = self
                .loader
                .round(&self.targets.events_ceiling, 0, n, None)
                .await?;
            self.counter
                .drained(&self.ceiling_email_queue, r.expected.verification_tokens)
                .await;
        }
        let r = self.loader.round(&self.targets.worker, 0, n, None).await?;
        self.next_index += n;
        check_round(&r, &self.counter, &mut self.checks, "warm-up").await
    }

    /// The closed-loop rounds (open at --rate when given); then, with
    /// --load-percent, open-loop rounds at those shares of the worker's
    /// closed-loop rate; then, with --rates, open-loop rounds at those
    /// absolute rates; every target alternated at each load.
    async fn measure(&mut self) -> Result<()> {
        let args = self.args;
        let mut phases = vec![Phase {
            load_percent: None,
            fixed_rate: None,
            rate: args.rate,
            n: args.commands,
        }];
        let mut phase = 0;
        while phase < phases.len() {
            let p = phases[phase];
            phase += 1;
            for k in 1..=args.rounds {
                if args.ceiling {
                    self.echo_round(k, "ceiling", p).await?;
                }
                if args.ceiling_events {
                    self.echo_round(k, EVENTS_CEILING, p).await?;
                }
                self.worker_round(k, p).await?;
            }
            if phase == 1 {
                let worker_rates: Vec<f64> = self
                    .rows
                    .iter()
                    .filter(|r| r.target == "worker")
                    .map(|r| r.result.rate)
                    .collect();
                let max = median(&worker_rates);
                for &pct in &args.load_percent {
                    let rate = max * pct / 100.0;
                    phases.push(Phase {
                        load_percent: Some(pct),
                        fixed_rate: None,
                        rate: Some(rate),
                        n: ((rate * args.open_loop_secs).round() as u64).max(1),
                    });
                }
                for &rate in &args.rates {
                    phases.push(Phase {
                        load_percent: None,
                        fixed_rate: Some(rate),
                        rate: Some(rate),
                        n: ((rate * args.rate_secs).round() as u64).max(1),
                    });
                }
            }
        }
        Ok(())
    }

    async fn echo_round(&mut self, k: u64, name: &'static str, p: Phase) -> Result<()> {
        let Phase { rate, n, .. } = p;
        let target = if name == EVENTS_CEILING {
            &self.targets.events_ceiling
        } else {
            &self.targets.ceiling
        };
        let before = self.meters.read(&self.workers, None).await;
        let r = self.loader.round(target, 0, n, rate).await?;
        let (_, split) = self.meters.since(before, &self.workers, n).await;
        if name == EVENTS_CEILING {
            let want = r.expected.verification_tokens;
            let emails = self.counter.drained(&self.ceiling_email_queue, want).await;
            self.checks.ceiling_email_requested += emails;
            if emails < want {
                self.checks.problems.push(format!(
                    "events ceiling round {k}: {emails} email.requested events for {want} verification tokens"
                ));
            }
        }
        self.rows.push(RoundRow {
            round: k,
            target: name,
            load_percent: p.load_percent,
            fixed_rate: p.fixed_rate,
            result: r,
            cpu_secs_per_1k: None,
            cpu_per_1k: split,
            stages: None,
        });
        Ok(())
    }

    async fn worker_round(&mut self, k: u64, p: Phase) -> Result<()> {
        let Phase { rate, n, .. } = p;
        let before = self.meters.read(&self.workers, None).await;
        let samples = batch_samples_of(&self.metrics_addrs).await;
        let r = self
            .loader
            .round(&self.targets.worker, self.next_index, n, rate)
            .await?;
        let (worker_cpu, split) = self.meters.since(before, &self.workers, n).await;
        let stages = stages_between(&samples, &batch_samples_of(&self.metrics_addrs).await);
        self.next_index += n;
        check_round(&r, &self.counter, &mut self.checks, &format!("round {k}")).await?;
        self.rows.push(RoundRow {
            round: k,
            target: "worker",
            load_percent: p.load_percent,
            fixed_rate: p.fixed_rate,
            cpu_secs_per_1k: Some(worker_cpu),
            cpu_per_1k: split,
            result: r,
            stages,
        });
        Ok(())
    }
}
