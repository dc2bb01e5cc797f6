//! One simulated run: workers (the real pipeline and outbox relay on the
//! in-memory broker and store), callers publishing commands and retrying
//! some, and the seed's faults (crashes, sessions dropping, lost commit
//! results, nacks, a token revoked or a profile disabled between any two
//! steps), then a quiet period in which everything must drain, then the
//! invariants.

use super::broker::{BrokerState, SimBroker};
use super::sim::{Faults, Sim, SimWorld};
use super::store::{SimStore, StoreState};
use profile_worker::broker::Properties;
use profile_worker::config::Settings;
use profile_worker::domain::{AccessToken, Profile, Tenant, TenantPermission};
use profile_worker::pipeline::bugs::Bug;
use profile_worker::pipeline::known::SharedKnown;
use profile_worker::pipeline::outbox::ConfirmedEvents;
use profile_worker::pipeline::ports::Ports;
use profile_worker::pipeline::{Parts, Pipeline, Prepared};
use profile_worker::store::access_token_hash;
use std::collections::{BTreeMap, BTreeSet};
use std::hash::{Hash, Hasher};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

struct SimPorts;

impl Ports for SimPorts {
    type Broker = SimBroker;
    type Store = SimStore;
    type World = SimWorld;
}

/// What a run found.
pub struct Outcome {
    pub violations: Vec<String>,
    /// A digest of everything that happened: the same seed gives the same.
    pub digest: u64,
    pub summary: String,
    pub journal: Vec<String>,
}

/// The run's shape, drawn from the seed.
#[derive(Debug)]
struct Shape {
    workers: usize,
    consumers: usize,
    batch: usize,
    prefetch: usize,
    known_rows: usize,
    cooldown_secs: u64,
    commands: usize,
    faults: Faults,
}

impl Shape {
    fn draw(r: &mut fastrand::Rng) -> Shape {
        Shape {
            workers: r.usize(1..=3),
            consumers: r.usize(1..=2),
            batch: r.usize(1..=8),
            prefetch: r.usize(1..=16),
            known_rows: if r.bool() { 10_000 } else { 0 },
            cooldown_secs: [0, 0, 2, 30][r.usize(0..4)],
            commands: r.usize(10..=40),
            faults: Faults {
                on: true,
                store_down: r.f64() * 0.05,
                commit_result_lost: r.f64() * 0.15,
                nack: r.f64() * 0.03,
                session_drop: r.f64() * 0.02,
            },
        }
    }
}

const TOKENS: [&str; 2] = ["token-a", "token-b"];
const PROFILES: [&str; 4] = ["p1", "p2", "p3", "p4"];

fn settings(shape: &Shape) -> Settings {
    use clap::Parser;
    #[derive(Parser)]
    struct Only {
        #[command(flatten)]
        s: Settings,
    }
    let n = |v: usize| v.to_string();
    Only::parse_from([
        "simulation",
        "--verification-url=https://app.example.com/verify",
        &format!("--batch-size={}", n(shape.batch)),
        &format!("--known-rows={}", n(shape.known_rows)),
        &format!("--email-cooldown-secs={}", shape.cooldown_secs),
        "--delivery-limit=1000",
        "--outbox-grace-secs=2",
        "--db-retry-min-ms=5",
        "--db-retry-max-ms=200",
        "--poison-retry-min-ms=5",
        "--poison-retry-max-ms=100",
        "--shutdown-grace-secs=5",
        "--reply-to-prefixes=amq.gen-",
        "--events-exchange=profile.events",
        "--email-exchange=profile.email",
        "--dead-letter-exchange=profile.commands.dlx",
    ])
    .s
}

fn seed_store(state: StoreState) -> StoreState {
    let mut st = state.with_server(42);
    let all = vec![TenantPermission {
        tenant: "*".into(),
        allowed_actions: vec!["MANAGE_PROFILES".into(), "MANAGE_TICKETS".into()],
    }];
    for t in TOKENS {
        let xmin = st.next_xid();
        st.tokens.insert(
            access_token_hash(t),
            (
                t.to_string(),
                AccessToken {
                    application: "sim".into(),
                    expires_on: None,
                    tenant_permissions: all.clone(),
                },
                xmin,
            ),
        );
    }
    let xmin = st.next_xid();
    st.tenants.insert(
        "t1".into(),
        (
            Tenant {
                link_hosts: vec!["app.example.com".into()],
            },
            xmin,
        ),
    );
    for (i, p) in PROFILES.iter().enumerate() {
        let xmin = st.next_xid();
        st.profiles.insert(
            p.to_string(),
            (
                Profile {
                    id: p.to_string(),
                    // p3's tenant has no row.
                    tenant: if i == 2 { "t2" } else { "t1" }.into(),
                    email: format!("{p}@example.com"),
                    enabled: i != 3,
                    locale: None,
                },
                xmin,
            ),
        );
    }
    st
}

/// A simulated worker process: its consumers and relay, until it crashes
/// (every task aborted) or the run ends.
struct Process {
    tasks: Tasks,
    stop: CancellationToken,
}

/// Every task of a process, batches completing included, so a crash stops all.
type Tasks = Arc<Mutex<Vec<tokio::task::AbortHandle>>>;

impl Process {
    fn start(
        worker: usize,
        sim: &Sim,
        settings: &Arc<Settings>,
        shape: &Shape,
        bug: Option<Bug>,
    ) -> Process {
        let tasks: Tasks = Default::default();
        let stop = CancellationToken::new();
        let confirmed = ConfirmedEvents::default();
        let known = SharedKnown::new(shape.known_rows);
        let world = Arc::new(SimWorld(sim.clone()));
        for _ in 0..shape.consumers {
            let (sim, settings, stop, confirmed, known, world, kept) = (
                sim.clone(),
                settings.clone(),
                stop.clone(),
                confirmed.clone(),
                known.clone(),
                world.clone(),
                tasks.clone(),
            );
            let prefetch = shape.prefetch;
            let handle = tokio::spawn(async move {
                while !stop.is_cancelled() {
                    let broker = SimBroker::consume(&sim, worker, prefetch);
                    let pipeline = Arc::new(
                        Pipeline::<SimPorts>::new(Parts {
                            store: SimStore(sim.clone()),
                            confirmed: confirmed.clone(),
                            known: known.clone(),
                            broker: broker.clone(),
                            world: world.clone(),
                            lane: "interactive",
                            settings: settings.clone(),
                            shutdown: stop.clone(),
                            frame_max: 131_072,
                        })
                        .with_bug(bug),
                    );
                    consume(
                        &broker,
                        pipeline,
                        settings.worker.batch_size as usize,
                        &stop,
                        &kept,
                    )
                    .await;
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
            });
            tasks.lock().unwrap().push(handle.abort_handle());
        }
        // The relay, restarted with each session as the worker's is.
        let (rsim, rsettings, rstop) = (sim.clone(), settings.clone(), stop.clone());
        let relay = tokio::spawn(async move {
            while !rstop.is_cancelled() {
                let epoch = rsim.lock().broker.epoch(worker);
                let session = rstop.child_token();
                let run = tokio::spawn(profile_worker::pipeline::outbox::relay_loop(
                    SimStore(rsim.clone()),
                    confirmed.clone(),
                    SimBroker::publisher(&rsim, worker),
                    rsettings.clone(),
                    session.clone(),
                ));
                while !rstop.is_cancelled() && rsim.lock().broker.epoch(worker) == epoch {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                session.cancel();
                let _ = run.await;
            }
        });
        tasks.lock().unwrap().push(relay.abort_handle());
        Process { tasks, stop }
    }

    /// kill -9: every task stops at whatever await it was on.
    fn crash(self) {
        self.stop.cancel();
        for t in self.tasks.lock().unwrap().drain(..) {
            t.abort();
        }
    }
}

/// One consumer, as `worker::session` runs it: a batch is prepared while the
/// one before it waits for its confirms, and batches complete in order.
async fn consume(
    broker: &SimBroker,
    pipeline: Arc<Pipeline<SimPorts>>,
    max_batch: usize,
    stop: &CancellationToken,
    kept: &Tasks,
) {
    type Done = JoinHandle<bool>;
    let mut completing: Option<Done> = None;
    loop {
        if stop.is_cancelled() {
            break;
        }
        let Ok(batch) = broker.fetch(max_batch).await else {
            break;
        };
        if batch.is_empty() {
            if completing.as_ref().is_some_and(|c| c.is_finished()) {
                let ok = completing.take().expect("some").await.unwrap_or(false);
                if !ok {
                    break;
                }
            }
            tokio::time::sleep(Duration::from_millis(1)).await;
            continue;
        }
        let Ok(prepared) = pipeline.prepare(batch).await else {
            break;
        };
        if let Some(previous) = completing.take() {
            if !previous.await.unwrap_or(false) {
                break;
            }
        }
        match prepared {
            Prepared::Committed(c) => {
                let p = pipeline.clone();
                let handle = tokio::spawn(async move { p.complete(c).await.is_ok() });
                kept.lock().unwrap().push(handle.abort_handle());
                completing = Some(handle);
            }
            Prepared::Failed(f) => {
                if pipeline.recover(f).await.is_err() {
                    break;
                }
            }
        }
    }
    if let Some(c) = completing {
        c.abort();
    }
}

/// One command a caller published, and the correlations it was sent with.
struct Published {
    message_id: String,
    correlations: Vec<String>,
    malformed: bool,
}

pub fn run(seed: u64, bug: Option<Bug>) -> Outcome {
    // The backoffs' jitter comes from fastrand's thread-local generator.
    fastrand::seed(seed);
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .start_paused(true)
        .build()
        .expect("a runtime");
    rt.block_on(scenario(seed, bug))
}

async fn scenario(seed: u64, bug: Option<Bug>) -> Outcome {
    let mut r = fastrand::Rng::with_seed(seed.rotate_left(17) ^ 0x9e37_79b9_7f4a_7c15);
    let shape = Shape::draw(&mut r);
    let settings = Arc::new(settings(&shape));
    let sim = Sim::new(
        seed,
        shape.faults,
        BrokerState::new(&settings.broker),
        seed_store(StoreState::default()),
    );
    let mut procs: Vec<Option<Process>> = (0..shape.workers)
        .map(|w| Some(Process::start(w, &sim, &settings, &shape, bug)))
        .collect();
    let mut published: Vec<Published> = Vec::new();
    let mut correlations = 0usize;
    let mut down_until: BTreeMap<usize, u32> = BTreeMap::new();
    let mut step = 0u32;
    while published.len() < shape.commands {
        step += 1;
        tokio::time::sleep(Duration::from_micros(r.u64(0..3_000))).await;
        // Crashed workers come back after a few steps.
        for (w, until) in down_until.clone() {
            if step >= until {
                down_until.remove(&w);
                procs[w] = Some(Process::start(w, &sim, &settings, &shape, bug));
                sim.lock().note(format!("worker {w} restarts"));
            }
        }
        let roll = r.u32(0..100);
        if roll < 70 {
            // A new command.
            let n = published.len();
            let message_id = format!("m{n}");
            let token = TOKENS[r.usize(0..TOKENS.len())];
            let profile = PROFILES[r.usize(0..PROFILES.len())];
            let kind = r.u32(0..10);
            let (command, body) = match kind {
                0 => ("create-ticket", b"{not json".to_vec()),
                1..=5 => (
                    "create-ticket",
                    serde_json::json!({"accessTokenId": token, "profileId": profile})
                        .to_string()
                        .into_bytes(),
                ),
                _ => (
                    "create-verification-token",
                    serde_json::json!({"accessTokenId": token, "id": profile})
                        .to_string()
                        .into_bytes(),
                ),
            };
            let correlation = format!("c{correlations}");
            correlations += 1;
            {
                let mut s = sim.lock();
                s.store
                    .commands
                    .insert(message_id.clone(), (command, token.into(), profile.into()));
                s.broker.publish_command(
                    command,
                    command_properties(command, &message_id, &correlation),
                    body.clone(),
                );
                s.note(format!("publish {message_id} {correlation} {command}"));
            }
            published.push(Published {
                message_id,
                correlations: vec![correlation],
                malformed: kind == 0,
            });
            // Sometimes the caller retries at once: the same message_id again.
            if r.u32(0..100) < 15 {
                let p = published.last_mut().expect("just pushed");
                let again = format!("c{correlations}");
                correlations += 1;
                let mut s = sim.lock();
                s.broker.publish_command(
                    command,
                    command_properties(command, &p.message_id, &again),
                    body,
                );
                s.note(format!("retry {} {again}", p.message_id));
                p.correlations.push(again);
            }
        } else if roll < 80 && !published.is_empty() {
            // A caller retries an earlier command (its reply was slow).
            let i = r.usize(0..published.len());
            let again = format!("c{correlations}");
            correlations += 1;
            let p = &mut published[i];
            let mut s = sim.lock();
            if let Some(m) = s.broker.replay_of(&p.message_id) {
                s.broker.publish_command(
                    &m.routing_key,
                    m.properties
                        .clone()
                        .with_correlation_id(again.clone().into()),
                    m.body.clone(),
                );
                s.note(format!("retry {} {again}", p.message_id));
                p.correlations.push(again);
            }
        } else if roll < 85 {
            // kill -9 a worker; it comes back a few steps later.
            let w = r.usize(0..shape.workers);
            if let Some(p) = procs[w].take() {
                p.crash();
                let mut s = sim.lock();
                s.broker.drop_session(w);
                s.note(format!("worker {w} crashes"));
                down_until.insert(w, step + r.u32(1..5));
            }
        } else if roll < 87 {
            let token = TOKENS[r.usize(0..TOKENS.len())];
            let mut s = sim.lock();
            let xmin = s.store.next_xid();
            let hash = access_token_hash(token);
            if s.store.tokens.remove(&hash).is_some() {
                s.store.revoked.insert(token.into());
                s.note(format!("revoke {token} (xid {xmin})"));
            }
        } else if roll < 89 {
            let profile = PROFILES[r.usize(0..PROFILES.len())];
            let mut s = sim.lock();
            let xmin = s.store.next_xid();
            if let Some((p, x)) = s.store.profiles.get_mut(profile) {
                if p.enabled {
                    p.enabled = false;
                    *x = xmin;
                    s.store.disabled.insert(profile.into());
                    s.note(format!("disable {profile}"));
                }
            }
        }
    }
    // Quiet: no more faults, every worker up; everything must drain.
    sim.lock().faults.on = false;
    for (w, p) in procs.iter_mut().enumerate() {
        if p.is_none() {
            *p = Some(Process::start(w, &sim, &settings, &shape, bug));
        }
    }
    let drained = {
        let mut drained = false;
        for _ in 0..6_000 {
            tokio::time::sleep(Duration::from_millis(100)).await;
            let s = sim.lock();
            if s.broker.ready.is_empty() && s.broker.unacked() == 0 && s.store.outbox.is_empty() {
                drained = true;
                break;
            }
        }
        drained
    };
    for p in procs.into_iter().flatten() {
        p.crash();
    }
    let mut s = sim.lock();
    if !drained {
        let (ready, unacked, outbox) = (
            s.broker.ready.len(),
            s.broker.unacked(),
            s.store.outbox.len(),
        );
        s.violation(format!(
            "did not drain in 10 minutes without faults: {ready} ready, {unacked} unacked, {outbox} outbox rows"
        ));
    }
    check(&mut s, &published, shape.cooldown_secs);
    let mut h = std::collections::hash_map::DefaultHasher::new();
    s.journal.hash(&mut h);
    Outcome {
        violations: s.violations.clone(),
        digest: h.finish(),
        summary: format!(
            "{shape:?}; {} commands, {} replies, {} events, {} dead letters, {} stored",
            published.len(),
            s.broker.replies.len(),
            s.broker.events.len(),
            s.broker.dead.len(),
            s.store.processed.len()
        ),
        journal: s.journal.clone(),
    }
}

fn command_properties(command: &str, message_id: &str, correlation: &str) -> Properties {
    Properties::default()
        .with_type(command.into())
        .with_content_type("application/json".into())
        .with_message_id(message_id.into())
        .with_correlation_id(correlation.into())
        .with_reply_to("amq.rabbitmq.reply-to".into())
}

/// The invariants, after the run has drained.
fn check(s: &mut super::sim::State, published: &[Published], cooldown_secs: u64) {
    let mut found = Vec::new();
    let replies_of = |c: &str| -> Vec<&super::broker::Reply> {
        s.broker
            .replies
            .iter()
            .filter(|r| r.correlation == c)
            .collect()
    };
    for p in published {
        let stored = s.store.processed.get(&p.message_id);
        for c in &p.correlations {
            let replies = replies_of(c);
            if replies.is_empty() && !s.broker.refused_replies.contains(c) {
                found.push(format!("{} ({c}) was never answered", p.message_id));
            }
            for r in replies {
                // A 200 is a created record's answer: the stored one, always.
                if r.status == 200 {
                    match stored {
                        Some(st) if st.reply.status == 200 && st.reply.body == r.body => {}
                        Some(st) => found.push(format!(
                            "{} ({c}) answered 200 {} but its stored record says {} {}",
                            p.message_id, r.body, st.reply.status, st.reply.body
                        )),
                        None => found.push(format!(
                            "{} ({c}) answered 200 with nothing stored",
                            p.message_id
                        )),
                    }
                }
            }
        }
    }
    // A malformed command is dead-lettered: by the worker (with its code), or,
    // when the broker refused that, by the queue's own dead-lettering.
    for p in published.iter().filter(|p| p.malformed) {
        let dead = s
            .broker
            .dead
            .iter()
            .any(|d| d.message_id.as_deref() == Some(p.message_id.as_str()));
        if !dead {
            found.push(format!(
                "{} was malformed and never dead-lettered",
                p.message_id
            ));
        }
    }
    // Each row once: a ticket or token per created command, no more.
    let mut per_message: BTreeMap<String, usize> = BTreeMap::new();
    for (_, m) in s.store.tickets.iter() {
        *per_message
            .entry(m.clone().unwrap_or_default())
            .or_default() += 1;
    }
    for (_, m) in s.store.verification_tokens.iter() {
        *per_message
            .entry(m.clone().unwrap_or_default())
            .or_default() += 1;
    }
    for (m, n) in &per_message {
        if *n > 1 {
            found.push(format!("{m} wrote {n} rows"));
        }
    }
    // Each event at least once, always as the same message; none for a row
    // that was never written.
    let mut bodies: BTreeMap<&str, BTreeSet<&str>> = BTreeMap::new();
    for e in &s.broker.events {
        bodies.entry(&e.message_id).or_default().insert(&e.body);
    }
    let written: BTreeMap<String, &str> = s
        .store
        .written
        .iter()
        .map(|(id, e)| (id.to_string(), e.routing_key.as_str()))
        .collect();
    for id in written.keys() {
        if !bodies.contains_key(id.as_str()) {
            found.push(format!("event {id} was written and never published"));
        }
    }
    for e in &s.broker.events {
        if written
            .get(&e.message_id)
            .is_some_and(|k| *k != e.routing_key)
        {
            found.push(format!(
                "event {} was published as {}",
                e.message_id, e.routing_key
            ));
        }
    }
    for (id, b) in &bodies {
        if !written.contains_key(*id) {
            found.push(format!(
                "event {id} was published with no row written for it"
            ));
        }
        if b.len() > 1 {
            found.push(format!(
                "event {id} was published with {} different bodies",
                b.len()
            ));
        }
    }
    // The cooldown: one email per profile and purpose per window.
    if cooldown_secs > 0 {
        let mut by_key: BTreeMap<(&str, &str), Vec<i64>> = BTreeMap::new();
        for (p, purpose, at) in &s.store.claims {
            by_key.entry((p, purpose)).or_default().push(*at);
        }
        for ((p, purpose), mut at) in by_key {
            at.sort();
            for w in at.windows(2) {
                if w[1] - w[0] < cooldown_secs as i64 * 1000 {
                    found.push(format!(
                        "{p} got two {purpose} emails {} ms apart (cooldown {cooldown_secs} s)",
                        w[1] - w[0]
                    ));
                }
            }
        }
    }
    if s.broker.unexplained > 0 {
        let n = s.broker.unexplained;
        found.push(format!(
            "{n} dead letters from the worker carry no x-error-code"
        ));
    }
    for f in found {
        s.violation(f);
    }
}
