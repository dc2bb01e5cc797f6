//! The house's rules that the compiler does not check by itself: the pipeline
//! reaches RabbitMQ and PostgreSQL only through its ports, and takes its
//! clock and randomness through them too, so the simulation
//! (tests/simulation) runs the same code the worker does.

fn sources(dir: &str) -> Vec<(String, String)> {
    let root = format!("{}/{dir}", env!("CARGO_MANIFEST_DIR"));
    let mut out: Vec<(String, String)> = std::fs::read_dir(&root)
        .unwrap_or_else(|e| panic!("{root}: {e}"))
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "rs"))
        .map(|p| {
            let text = std::fs::read_to_string(&p).unwrap();
            // The code, not its unit tests or comments.
            let code = text.split("#[cfg(test)]").next().unwrap_or_default();
            let code: String = code
                .lines()
                .filter(|l| !l.trim_start().starts_with("//"))
                .collect::<Vec<_>>()
                .join("\n");
            (p.display().to_string(), code)
        })
        .collect();
    out.sort();
    out
}

#[test]
fn the_pipeline_names_no_broker_or_database_client() {
    let files = sources("src/pipeline");
    assert!(files.len() > 8, "{files:?}");
    for (path, code) in &files {
        for name in ["lapin", "tokio_postgres", "deadpool", "postgres_types"] {
            assert!(
                !code.contains(name),
                "{path} names {name}: the pipeline reaches it only through pipeline/ports.rs"
            );
        }
    }
}

#[test]
fn the_pipeline_takes_time_and_randomness_through_its_ports() {
    for (path, code) in sources("src/pipeline") {
        if path.ends_with("ports.rs") {
            continue; // SystemWorld: the real ones, behind the port.
        }
        for call in [
            "SystemTime::now",
            "Uuid::new_v4",
            "random_ids",
            "getrandom",
            "fastrand::",
        ] {
            assert!(
                !code.contains(call),
                "{path} calls {call}: decisions take it from ports::World"
            );
        }
    }
}

/// The pure core (the contract, the domain's rules, the records, rendering
/// and the plan) is pure because nothing it names can do I/O: it names only
/// itself, and no runtime, client, telemetry or randomness crate.
#[test]
fn the_pure_core_names_only_itself() {
    let core = ["contract", "domain", "records", "render", "pipeline::plan"];
    let mut files: Vec<(String, String)> = sources("src/contract");
    for f in [
        "src/domain.rs",
        "src/render.rs",
        "src/records.rs",
        "src/pipeline/plan.rs",
    ] {
        let path = format!("{}/{f}", env!("CARGO_MANIFEST_DIR"));
        let text = std::fs::read_to_string(&path).unwrap();
        let code = text
            .split("#[cfg(test)]")
            .next()
            .unwrap_or_default()
            .to_string();
        files.push((path, code));
    }
    for (path, code) in &files {
        for (at, _) in code.match_indices("crate::") {
            let rest = &code[at + "crate::".len()..];
            assert!(
                core.iter().any(|m| rest.starts_with(m)),
                "{path} names crate::{}: the pure core names only {core:?}",
                rest.split(|c: char| !c.is_alphanumeric() && c != '_' && c != ':')
                    .next()
                    .unwrap_or_default()
            );
        }
        for name in [
            "lapin",
            "tokio",
            "opentelemetry",
            "tracing",
            "metrics",
            "axum",
            "reqwest",
            "getrandom",
            "fastrand",
            "SystemTime",
        ] {
            assert!(
                !code.contains(&format!("{name}::")) && !code.contains(&format!("{name}}}")),
                "{path} names {name}: the pure core does no I/O"
            );
        }
    }
}
