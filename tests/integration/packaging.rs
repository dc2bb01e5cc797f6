//! compose.yaml, the Dockerfile and the README's configuration table checked
//! against the worker's real settings. No Docker engine runs here, so this is
//! what keeps them honest: a renamed setting fails this test, not a deployment.

use profile_worker::config::Settings;
use profile_worker::worker::check_settings;
use std::collections::BTreeSet;
use yaml_rust2::{Yaml, YamlLoader};

fn file(name: &str) -> String {
    std::fs::read_to_string(format!("{}/{name}", env!("CARGO_MANIFEST_DIR")))
        .unwrap_or_else(|e| panic!("{name}: {e}"))
}

fn compose() -> Yaml {
    let docs = YamlLoader::load_from_str(&file("compose.yaml")).expect("compose.yaml parses");
    docs.into_iter().next().expect("one document")
}

fn strings(y: &Yaml) -> Vec<String> {
    match y {
        Yaml::Array(a) => a
            .iter()
            .filter_map(|v| v.as_str().map(String::from))
            .collect(),
        Yaml::String(s) => vec![s.clone()],
        _ => vec![],
    }
}

#[test]
fn compose_publishes_nothing_beyond_loopback_and_runs_nothing_as_admin() {
    let c = compose();
    let services = c["services"].as_hash().expect("services");
    for (name, service) in services {
        for port in strings(&service["ports"]) {
            assert!(
                port.starts_with("127.0.0.1:"),
                "{name:?} publishes {port} beyond loopback"
            );
        }
    }
    let worker = &c["services"]["worker"]["environment"];
    let amqp = worker["AMQP_URL"].as_str().unwrap();
    let db = worker["DATABASE_URL"].as_str().unwrap();
    assert!(!amqp.contains("guest") && !amqp.contains("admin"), "{amqp}");
    assert!(
        !db.contains("owner"),
        "the worker runs as the runtime role: {db}"
    );
}

#[test]
fn compose_worker_environment_names_are_settings() {
    let c = compose();
    let worker = &c["services"]["worker"];
    let env = worker["environment"]
        .as_hash()
        .expect("the worker's environment is a mapping");
    let known: BTreeSet<String> = Settings::env_names().into_iter().collect();
    assert!(
        known.contains("HTTP_ADDR") && known.contains("AMQP_URL"),
        "{known:?}"
    );
    for key in env.keys() {
        let name = key.as_str().expect("names are strings");
        assert!(
            known.contains(name),
            "compose.yaml sets {name}, which profile-worker run does not read; known: {known:?}"
        );
    }
    // The values must also be ones the worker accepts.
    let value = |k: &str| {
        env[&Yaml::String(k.into())]
            .as_str()
            .unwrap_or_default()
            .to_string()
    };
    let mut s = Settings::from_env();
    s.broker.address.amqp_url = value("AMQP_URL").into();
    s.database.database_url = value("DATABASE_URL").into();
    s.worker.http_addr = value("HTTP_ADDR");
    s.worker.verification_url = Some(value("VERIFICATION_URL"));
    assert!(
        check_settings(&s).is_ok(),
        "compose's settings are valid: {:?}",
        check_settings(&s).err()
    );
    assert!(
        value("HTTP_ADDR").starts_with("0.0.0.0:"),
        "reachable from other containers"
    );
}

#[test]
fn compose_runs_the_stack_it_promises() {
    let c = compose();
    let services = &c["services"];
    assert!(services["rabbitmq"]["image"]
        .as_str()
        .unwrap()
        .contains("management"));
    let pg_volumes = strings(&services["postgres"]["volumes"]);
    assert!(
        pg_volumes
            .iter()
            .any(|v| v.starts_with("pgdata:") && v.ends_with("/var/lib/postgresql/data")),
        "{pg_volumes:?}"
    );
    assert!(
        !c["volumes"]["pgdata"].is_badvalue(),
        "the volume is declared"
    );

    let worker = &services["worker"];
    assert_eq!(worker["deploy"]["replicas"].as_i64(), Some(2));
    let check = strings(&worker["healthcheck"]["test"]).join(" ");
    let port = worker["environment"]["HTTP_ADDR"]
        .as_str()
        .unwrap()
        .rsplit(':')
        .next()
        .unwrap()
        .to_string();
    assert!(
        check.contains(&format!("127.0.0.1:{port}/readyz")),
        "the health check asks /readyz on HTTP_ADDR's port: {check}"
    );
    // Least privilege: the broker user and the migrations (as the owner) come first.
    for dep in ["rabbitmq-users", "migrate"] {
        assert_eq!(
            worker["depends_on"][dep]["condition"].as_str(),
            Some("service_completed_successfully"),
            "{dep}"
        );
    }
    let migrate = &services["migrate"]["environment"];
    assert!(migrate["DATABASE_URL"].as_str().unwrap().contains("owner"));
    assert_eq!(
        migrate["DATABASE_RUNTIME_ROLE"].as_str(),
        Some("profile_worker")
    );
    for dep in ["rabbitmq", "postgres"] {
        assert_eq!(
            worker["depends_on"][dep]["condition"].as_str(),
            Some("service_healthy"),
            "{dep}"
        );
        assert!(
            !services[dep]["healthcheck"]["test"].is_badvalue(),
            "{dep} has a health check"
        );
    }
}

#[test]
fn dockerfile_is_multi_stage_non_root_and_has_what_the_health_check_runs() {
    let d = file("Dockerfile");
    let froms = d.lines().filter(|l| l.starts_with("FROM ")).count();
    assert!(froms >= 2, "multi-stage");
    // Numeric and not root, in both images: under runAsNonRoot without a
    // runAsUser the kubelet refuses an image whose USER is a name.
    for (path, image) in [
        ("Dockerfile", d.clone()),
        (
            "examples/dispatcher/Dockerfile",
            file("examples/dispatcher/Dockerfile"),
        ),
    ] {
        let user = image
            .lines()
            .rev()
            .find_map(|l| l.strip_prefix("USER "))
            .expect("a USER line");
        let (uid, gid) = user.trim().split_once(':').unwrap_or((user.trim(), "0"));
        let uid: u32 = uid
            .parse()
            .unwrap_or_else(|_| panic!("{path}: USER {user} is no number"));
        assert!(
            uid != 0 && gid.parse::<u32>().is_ok(),
            "{path}: runs as {user}"
        );
    }
    // Reachable through a published port: not the binary's loopback default.
    assert!(
        d.contains("ENV HTTP_ADDR=0.0.0.0:8742"),
        "the image serves /readyz outside"
    );
    let c = compose();
    let check = strings(&c["services"]["worker"]["healthcheck"]["test"]);
    let program = &check[1];
    assert!(
        d.contains(&format!(" {program}")),
        "the runtime image installs {program}, which the health check runs"
    );
    // Everything the build compiles in must be copied into the build stage.
    for dir in ["src", "migrations", "vendor"] {
        assert!(d.contains(&format!("COPY {dir} {dir}")), "{dir}");
    }
}

#[test]
fn the_operations_guide_documents_every_setting() {
    let guide = file("docs/OPERATIONS.md");
    for name in Settings::env_names() {
        assert!(
            guide.contains(&format!("`{name}`")),
            "docs/OPERATIONS.md's configuration table lacks `{name}`"
        );
    }
}

#[test]
fn no_access_token_is_published_and_compose_says_how_to_make_one() {
    // CONTRACT §8: the repository's seeds and the image hold no token.
    for entry in std::fs::read_dir(format!("{}/seeds", env!("CARGO_MANIFEST_DIR"))).unwrap() {
        let path = entry.unwrap().path();
        let seed: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
        assert!(
            seed.get("accessTokens").is_none(),
            "{} seeds an access token whose ID is public",
            path.display()
        );
    }
    let dockerfile = file("Dockerfile");
    assert!(
        !dockerfile
            .lines()
            .any(|l| l.starts_with("COPY") && l.contains("seeds")),
        "the image copies a seed"
    );
    // Compose makes tokens with the binary, as the owner, shown once.
    let c = compose();
    let tool = &c["services"]["access-tokens"];
    assert_eq!(
        strings(&tool["entrypoint"]),
        ["profile-worker", "access-tokens"]
    );
    let db = tool["environment"]["DATABASE_URL"].as_str().unwrap();
    assert!(db.contains("profile_worker_owner"), "{db}");
    assert!(file("compose.yaml").contains("docker compose run --rm access-tokens create"));
    // run.sh makes a fresh token instead of reading one from a file.
    let run = file("scripts/run.sh");
    assert!(run.contains("access-tokens create"));
    assert!(
        !run.contains("seeds/example.json | "),
        "run.sh reads a token from a seed"
    );
}

#[test]
fn compose_makes_the_broker_users_of_the_trust_boundary() {
    let c = compose();
    let users = &c["services"]["rabbitmq-users"]["environment"];
    for password in [
        "WORKER_AMQP_PASSWORD",
        "DISPATCHER_AMQP_PASSWORD",
        "EVENTS_READER_AMQP_PASSWORD",
        "PUBLISHER_AMQP_PASSWORD",
    ] {
        assert!(users[password].as_str().is_some(), "{password}");
    }
    let script = file("deploy/compose/rabbitmq-users.sh");
    for user in [
        "profile-worker",
        "profile-email-dispatcher",
        "profile-events-reader",
        "profile-publisher",
    ] {
        assert!(script.contains(&format!("\nuser {user} ")), "{user}");
    }
    // The dispatcher: no configure, write on its queue's dead-letter exchange
    // only, read on its queue only.
    assert!(script.contains(
        r#"user profile-email-dispatcher "${DISPATCHER_AMQP_PASSWORD}" '^$' '^profile\\.email\\.dlx$' '^profile\\.email\\.dispatch$'"#
    ));
}

#[test]
fn compose_seeds_the_stack_and_makes_one_token_to_try_it_with() {
    let c = compose();
    let s = &c["services"];
    // The seed is mounted into a one-shot job, never baked into the image.
    assert_eq!(
        strings(&s["seed"]["command"]),
        ["seed", "/seeds/example.json"]
    );
    assert!(strings(&s["seed"]["volumes"]).contains(&"./seeds:/seeds:ro".to_string()));
    assert!(s["seed"]["environment"]["DATABASE_URL"]
        .as_str()
        .unwrap()
        .contains("profile_worker_owner"));
    // One token, made by the binary as the owner, on the first `up` only, its
    // ID printed in the job's log, which the comments and the guide point at.
    let token = &s["first-access-token"];
    let script = strings(&token["command"]).join(" ");
    assert!(
        script.contains("profile-worker access-tokens create"),
        "{script}"
    );
    assert!(
        script.contains("access-tokens list --json"),
        "made once: {script}"
    );
    assert!(token["environment"]["DATABASE_URL"]
        .as_str()
        .unwrap()
        .contains("profile_worker_owner"));
    assert_eq!(
        token["depends_on"]["seed"]["condition"].as_str(),
        Some("service_completed_successfully")
    );
    // The ID goes to a file only its user may read, on a volume, never to the
    // job's log (Docker keeps logs); a tool prints it once and deletes it.
    assert!(
        script.contains("umask 077") && script.contains("> /secrets/first-access-token"),
        "{script}"
    );
    assert!(!script.contains("access-tokens create --json"), "{script}");
    let volume = "first-token:/secrets".to_string();
    assert!(strings(&token["volumes"]).contains(&volume));
    let read = &s["read-first-token"];
    let reader = strings(&read["command"]).join(" ");
    assert!(
        reader.contains("cat /secrets/first-access-token && rm /secrets/first-access-token"),
        "{reader}"
    );
    assert!(strings(&read["volumes"]).contains(&volume));
    assert_eq!(read["logging"]["driver"].as_str(), Some("none"));
    assert!(strings(&read["profiles"]).contains(&"tools".to_string()));
    assert!(!c["volumes"]["first-token"].is_badvalue());
    assert!(file("Dockerfile").contains("mkdir -m 700 /secrets && chown 10001 /secrets"));
    for doc in ["compose.yaml", "docs/OPERATIONS.md"] {
        let text = file(doc);
        assert!(
            text.contains("docker compose run --rm read-first-token"),
            "{doc} says where to read the token"
        );
        assert!(
            !text.contains("docker compose logs first-access-token"),
            "{doc}"
        );
    }
}

#[test]
fn callers_use_the_publisher_user_that_compose_and_the_set_up_make() {
    // compose's RabbitMQ has no guest: what run.sh prints, the examples'
    // defaults and compose's own instructions use the publisher user, which
    // scripts/services.sh makes too, with the same rights as compose's.
    let services = file("scripts/services.sh");
    assert!(services.contains(r#"PW_PUBLISHER_USER="${PW_PUBLISHER_USER:-profile-publisher}""#));
    assert!(services.contains(
        r#"export PUBLISHER_AMQP_URL="${PUBLISHER_AMQP_URL:-amqp://$PW_PUBLISHER_USER:$PW_PUBLISHER_PASSWORD@"#
    ));
    assert!(services.contains(
        r#"rabbit_user "$PW_PUBLISHER_USER" "$PW_PUBLISHER_PASSWORD" '^amq\.gen-.*$' '^profile\.commands$' '^amq\.gen-.*$'"#
    ));
    assert!(file("deploy/compose/rabbitmq-users.sh").contains(
        r#"user profile-publisher "${PUBLISHER_AMQP_PASSWORD}" '^amq\\.gen-.*$' '^profile\\.commands$' '^amq\\.gen-.*$'"#
    ));
    let run = file("scripts/run.sh");
    let sends: Vec<&str> = run
        .lines()
        .filter(|l| l.contains(" send create-"))
        .collect();
    assert_eq!(sends.len(), 2, "{sends:?}");
    assert!(sends
        .iter()
        .all(|l| l.contains("AMQP_URL='$PUBLISHER_AMQP_URL'")));
    for example in ["examples/python/publisher.py", "examples/node/publisher.js"] {
        let text = file(example);
        assert!(!text.contains("guest:guest"), "{example} defaults to guest");
        assert!(text.contains("amqp://profile-publisher:profile-publisher@127.0.0.1:5672/%2f"));
    }
    assert!(file("compose.yaml").contains("AMQP_URL=amqp://profile-publisher:"));
}

fn kubernetes(path: &str) -> Yaml {
    let docs = YamlLoader::load_from_str(&file(&format!("deploy/kubernetes/{path}")))
        .unwrap_or_else(|e| panic!("{path}: {e}"));
    docs.into_iter().next().expect("one document")
}

fn container(doc: &Yaml) -> &Yaml {
    &doc["spec"]["template"]["spec"]["containers"][0]
}

fn env_value<'a>(c: &'a Yaml, name: &str) -> Option<&'a str> {
    c["env"]
        .as_vec()?
        .iter()
        .find(|e| e["name"].as_str() == Some(name))?["value"]
        .as_str()
}

#[test]
fn kubernetes_worker_and_migrate_job_set_only_settings_the_binary_has() {
    let known: BTreeSet<String> = Settings::env_names().into_iter().collect();
    for path in ["base/worker-deployment.yaml", "base/migrate-job.yaml"] {
        let doc = kubernetes(path);
        let names: Vec<String> = container(&doc)["env"]
            .as_vec()
            .unwrap()
            .iter()
            .map(|e| e["name"].as_str().unwrap().to_string())
            .collect();
        for n in &names {
            assert!(
                known.contains(n),
                "{path}: {n} is not a setting of the binary"
            );
        }
    }
}

/// `VERIFICATION_URL` has no default (issue 31): the worker takes it from a
/// ConfigMap the overlay makes, with an https URL; compose sets its own.
#[test]
fn every_deployment_sets_the_verification_url() {
    let deployment = kubernetes("base/worker-deployment.yaml");
    let c = container(&deployment);
    let e = c["env"]
        .as_vec()
        .unwrap()
        .iter()
        .find(|e| e["name"].as_str() == Some("VERIFICATION_URL"))
        .expect("the worker's VERIFICATION_URL");
    assert_eq!(
        e["valueFrom"]["configMapKeyRef"]["name"].as_str(),
        Some("profile-worker")
    );
    let overlay = kubernetes("overlays/example/kustomization.yaml");
    let literals = strings(&overlay["configMapGenerator"][0]["literals"]);
    let url = literals
        .iter()
        .find_map(|l| l.strip_prefix("VERIFICATION_URL="))
        .expect("the overlay sets it");
    let mut s = Settings::from_env();
    s.worker.verification_url = Some(url.to_string());
    assert!(s.worker.validate().is_ok(), "{url}");
    assert!(url.starts_with("https://"), "{url}");
    assert!(file("scripts/run.sh").contains("VERIFICATION_URL"));
    assert!(file("docs/OPERATIONS.md").contains("`VERIFICATION_URL` | (none: required)"));
}

#[test]
fn kubernetes_worker_is_probed_graced_and_locked_down() {
    let deployment = kubernetes("base/worker-deployment.yaml");
    let pod = &deployment["spec"]["template"]["spec"];
    let c = container(&deployment);
    assert_eq!(env_value(c, "HTTP_ADDR"), Some("0.0.0.0:8742"));
    assert_eq!(c["ports"][0]["containerPort"].as_i64(), Some(8742));
    assert_eq!(
        c["readinessProbe"]["httpGet"]["path"].as_str(),
        Some("/readyz")
    );
    assert_eq!(
        c["livenessProbe"]["httpGet"]["path"].as_str(),
        Some("/healthz")
    );
    let grace: i64 = env_value(c, "SHUTDOWN_GRACE_SECS")
        .unwrap()
        .parse()
        .unwrap();
    assert!(
        pod["terminationGracePeriodSeconds"].as_i64().unwrap() > grace,
        "the pod's grace outlasts the worker's"
    );
    assert!(!c["resources"]["requests"]["cpu"].is_badvalue());
    assert!(!c["resources"]["limits"]["memory"].is_badvalue());
    // The URLs (secrets) come from Secrets, never inline.
    for url in ["DATABASE_URL", "AMQP_URL"] {
        let e = c["env"]
            .as_vec()
            .unwrap()
            .iter()
            .find(|e| e["name"].as_str() == Some(url))
            .unwrap();
        assert!(e["value"].is_badvalue(), "{url} inline");
        assert_eq!(
            e["valueFrom"]["secretKeyRef"]["name"].as_str(),
            Some("profile-worker")
        );
    }
    // The migrate Job alone has the owner's URL.
    let job = kubernetes("base/migrate-job.yaml");
    let jc = container(&job);
    assert_eq!(strings(&jc["args"]), ["migrate"]);
    assert_eq!(
        jc["env"][0]["valueFrom"]["secretKeyRef"]["name"].as_str(),
        Some("profile-worker-owner")
    );
    // Every pod: non-root, read-only root, no capabilities, no escalation.
    for (path, doc) in [
        ("worker", &deployment),
        ("migrate", &job),
        (
            "dispatcher",
            &kubernetes("components/dispatcher/dispatcher-deployment.yaml"),
        ),
    ] {
        let pod = &doc["spec"]["template"]["spec"];
        assert_eq!(
            pod["securityContext"]["runAsNonRoot"].as_bool(),
            Some(true),
            "{path}"
        );
        let sc = &container(doc)["securityContext"];
        assert_eq!(sc["readOnlyRootFilesystem"].as_bool(), Some(true), "{path}");
        assert_eq!(
            sc["allowPrivilegeEscalation"].as_bool(),
            Some(false),
            "{path}"
        );
        assert_eq!(strings(&sc["capabilities"]["drop"]), ["ALL"], "{path}");
    }
    // KEDA scales the worker on the command queue's depth.
    let scaled = kubernetes("components/keda/worker-scaledobject.yaml");
    assert_eq!(
        scaled["spec"]["scaleTargetRef"]["name"].as_str(),
        Some("profile-worker")
    );
    let queues: Vec<&str> = scaled["spec"]["triggers"]
        .as_vec()
        .unwrap()
        .iter()
        .map(|t| t["metadata"]["queueName"].as_str().unwrap())
        .collect();
    assert_eq!(
        queues,
        ["profile.commands", "profile.commands.bulk"],
        "scaled on both lanes"
    );
}

/// Every manifest against Kubernetes' own schemas and the CRDs' published
/// ones, offline (deploy/kubernetes/validate.py; an unknown field fails).
#[test]
fn kubernetes_manifests_validate_against_their_schemas() {
    let python = std::env::var("EXAMPLES_PYTHON").unwrap_or_else(|_| "python3".into());
    let out = std::process::Command::new(&python)
        .arg(format!(
            "{}/deploy/kubernetes/validate.py",
            env!("CARGO_MANIFEST_DIR")
        ))
        .output()
        .unwrap_or_else(|e| panic!("{python}: {e} (the README's test command installs it)"));
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "{text}");
    for kind in [
        "Deployment",
        "Job",
        "ScaledObject",
        "ServiceMonitor",
        "NetworkPolicy",
        "PodDisruptionBudget",
    ] {
        assert!(
            text.contains(&format!(": {kind} ")),
            "{kind} not validated:\n{text}"
        );
    }
}

/// The PrometheusRule of the prometheus component, as made from the one rules
/// file: the header, then the file's `groups:` block indented under `spec`.
fn prometheus_rule_from(rules: &str) -> String {
    let groups = &rules[rules.find("\ngroups:").expect("a groups: block") + 1..];
    let mut out = String::from(
        "# Made from deploy/prometheus/profile-worker.rules.yml by tests/integration/packaging.rs\n\
         # (UPDATE_MANIFESTS=1 cargo test --test integration packaging): edit the rules there.\n\
         apiVersion: monitoring.coreos.com/v1\n\
         kind: PrometheusRule\n\
         metadata:\n\
         \x20 name: profile-worker\n\
         \x20 labels:\n\
         \x20   app.kubernetes.io/name: profile-worker\n\
         \x20   app.kubernetes.io/component: worker\n\
         spec:\n",
    );
    for line in groups.lines() {
        if !line.is_empty() {
            out.push_str("  ");
        }
        out.push_str(line);
        out.push('\n');
    }
    out
}

/// One rules file: the PrometheusRule is made from it, and says the same.
#[test]
fn the_prometheusrule_is_the_rules_file() {
    let rules = file("deploy/prometheus/profile-worker.rules.yml");
    let made = prometheus_rule_from(&rules);
    let path = "deploy/kubernetes/components/prometheus/prometheusrule.yaml";
    if std::env::var_os("UPDATE_MANIFESTS").is_some() {
        std::fs::write(format!("{}/{path}", env!("CARGO_MANIFEST_DIR")), &made).unwrap();
    }
    assert_eq!(
        file(path),
        made,
        "{path} is stale: run UPDATE_MANIFESTS=1 cargo test --test integration packaging"
    );
    let rule = YamlLoader::load_from_str(&made).unwrap().remove(0);
    let groups = YamlLoader::load_from_str(&rules).unwrap().remove(0);
    assert_eq!(rule["spec"]["groups"], groups["groups"], "the same rules");
    assert_eq!(rule["kind"].as_str(), Some("PrometheusRule"));
}

/// The fields of the example dispatcher's `Settings` (pydantic-settings): one
/// environment variable each.
fn dispatcher_settings() -> BTreeSet<String> {
    let source = file("examples/dispatcher/dispatcher.py");
    let body = &source[source
        .find("class Settings(BaseSettings):")
        .expect("dispatcher.py has its Settings")..];
    body.lines()
        .skip(1)
        .take_while(|l| l.is_empty() || l.starts_with(' '))
        .filter_map(|l| l.strip_prefix("    ")?.split_once(':'))
        .map(|(name, _)| name.trim())
        .filter(|name| !name.is_empty() && name.chars().all(|c| c.is_ascii_uppercase() || c == '_'))
        .map(String::from)
        .collect()
}

/// compose's quickstart ends in Mailpit's inbox (issue 33): the dispatcher
/// reads the dispatch queue as its own broker user, after the worker has
/// declared it, and delivers to Mailpit over the compose network, whose web
/// inbox is published on loopback. No Docker engine runs here, so the wiring
/// is checked on paper, name by name.
#[test]
fn compose_delivers_verification_emails_to_a_web_inbox() {
    let c = compose();
    let services = &c["services"];
    let mailpit = &services["mailpit"];
    assert!(
        mailpit["image"].as_str().unwrap().contains("mailpit"),
        "a mail sink with a web inbox"
    );
    assert_eq!(strings(&mailpit["ports"]), ["127.0.0.1:8025:8025"]);

    let dispatcher = &services["dispatcher"];
    assert_eq!(dispatcher["build"].as_str(), Some("./examples/dispatcher"));
    let env = &dispatcher["environment"];
    let names: BTreeSet<String> = env
        .as_hash()
        .unwrap()
        .keys()
        .map(|k| k.as_str().unwrap().to_string())
        .collect();
    let known = dispatcher_settings();
    assert!(known.contains("SMTP_HOST") && known.contains("AMQP_URL"));
    let unknown: Vec<_> = names.difference(&known).collect();
    assert!(unknown.is_empty(), "not dispatcher settings: {unknown:?}");
    assert_eq!(env["SMTP_HOST"].as_str(), Some("mailpit"));
    assert_eq!(
        env["SMTP_PORT"].as_str(),
        Some("1025"),
        "Mailpit's SMTP port"
    );
    assert_eq!(strings(&mailpit["expose"]), ["1025"]);
    // Plain SMTP inside the compose network, so no login may be configured:
    // the dispatcher refuses one without TLS.
    assert_eq!(env["SMTP_TLS"].as_str(), Some("none"));
    assert!(env["SMTP_USER"].is_badvalue());
    assert!(
        env["MAIL_FROM"].as_str().is_some(),
        "MAIL_FROM has no default"
    );

    // Its own broker user, made by rabbitmq-users with the same password.
    let url = env["AMQP_URL"].as_str().unwrap();
    let (user, password) = url
        .strip_prefix("amqp://")
        .and_then(|r| r.split('@').next())
        .and_then(|c| c.split_once(':'))
        .unwrap();
    assert_eq!(user, "profile-email-dispatcher");
    assert!(url.contains("@rabbitmq:5672/"), "{url}");
    assert_eq!(
        services["rabbitmq-users"]["environment"]["DISPATCHER_AMQP_PASSWORD"].as_str(),
        Some(password)
    );
    assert!(file("deploy/compose/rabbitmq-users.sh")
        .contains(r#"user profile-email-dispatcher "${DISPATCHER_AMQP_PASSWORD}""#));
    // The worker declares the queue; the dispatcher may not.
    assert_eq!(
        dispatcher["depends_on"]["worker"]["condition"].as_str(),
        Some("service_healthy")
    );
    // Its claims survive a restart: DEDUPE_DB is on a declared volume.
    let db = env["DEDUPE_DB"].as_str().unwrap();
    let volume = strings(&dispatcher["volumes"])
        .into_iter()
        .find_map(|v| {
            let (name, dir) = v.split_once(':')?;
            db.starts_with(&format!("{}/", dir.split(':').next()?))
                .then(|| name.to_string())
        })
        .unwrap_or_else(|| panic!("{db} is on no volume"));
    assert!(!c["volumes"][volume.as_str()].is_badvalue(), "{volume}");
    // The health check asks /readyz on METRICS_ADDR's port.
    let port = env["METRICS_ADDR"]
        .as_str()
        .unwrap()
        .rsplit(':')
        .next()
        .unwrap();
    let check = strings(&dispatcher["healthcheck"]["test"]).join(" ");
    assert!(
        check.contains(&format!("127.0.0.1:{port}/readyz")),
        "{check}"
    );

    // The quickstart, in compose.yaml and OPERATIONS, ends in the inbox.
    for doc in ["compose.yaml", "docs/OPERATIONS.md"] {
        let text = file(doc);
        assert!(
            text.contains("send create-verification-token")
                && text.contains("http://127.0.0.1:8025"),
            "{doc}'s quickstart does not end in the inbox"
        );
    }
}

/// A documented default as the flag's default would print it: numbers lose
/// their thousands separators, sizes become bytes; `None` for no default.
fn documented_default(doc: &str) -> Option<String> {
    let doc = doc.trim().trim_matches('`');
    if doc == "–" || doc.starts_with("(none") {
        return None;
    }
    for (unit, bytes) in [(" GiB", 1u64 << 30), (" MiB", 1 << 20)] {
        if let Some(n) = doc.strip_suffix(unit) {
            return Some((n.replace(',', "").parse::<u64>().unwrap() * bytes).to_string());
        }
    }
    if doc.chars().all(|c| c.is_ascii_digit() || c == ',') {
        return Some(doc.replace(',', ""));
    }
    Some(doc.to_string())
}

/// OPERATIONS' configuration table against the binary: every setting it
/// names exists, and every default it states is the flag's default. This is
/// the drift that made it say "the worker caches no token" while KNOWN_ROWS
/// kept 10,000: prose can only be read, but a documented number can be
/// checked against the code it describes.
#[test]
fn the_operations_table_states_the_settings_real_defaults() {
    use clap::Args;
    let cmd = Settings::augment_args(clap::Command::new("run"));
    let defaults: std::collections::BTreeMap<String, Option<String>> = cmd
        .get_arguments()
        .filter_map(|a| {
            let env = a.get_env()?.to_string_lossy().into_owned();
            let default = a
                .get_default_values()
                .first()
                .map(|v| v.to_string_lossy().into_owned())
                .filter(|v| !v.is_empty());
            Some((env, default))
        })
        .collect();
    let known: BTreeSet<String> = Settings::env_names().into_iter().collect();
    let guide = file("docs/OPERATIONS.md");
    let table = guide
        .split("| env | default | meaning |")
        .nth(1)
        .expect("the configuration table")
        .split("\n\n")
        .next()
        .unwrap();
    let mut checked = 0;
    for row in table.lines().skip(2) {
        let cells: Vec<&str> = row.split(" | ").collect();
        let names: Vec<&str> = cells[0]
            .trim_start_matches("| ")
            .split(['/', ','])
            .map(|n| n.trim().trim_matches('`'))
            .collect();
        for name in &names {
            assert!(
                known.contains(*name) || *name == "TOKIO_WORKER_THREADS",
                "OPERATIONS documents {name}, which `run` does not read"
            );
        }
        let stated: Vec<&str> = cells[1].split(" / ").collect();
        if stated.len() != names.len() && stated.len() != 1 {
            continue;
        }
        for (i, name) in names.iter().enumerate() {
            let Some(code) = defaults.get(*name) else {
                continue; // the SDK's variables, tokio's
            };
            let doc = stated.get(i).or(stated.first()).unwrap();
            if doc.starts_with('`') && doc.trim_matches('`').starts_with('.') {
                continue; // a suffix of the name before it
            }
            assert_eq!(
                &documented_default(doc),
                code,
                "OPERATIONS states {name}'s default as {doc}"
            );
            checked += 1;
        }
    }
    assert!(checked > 40, "only {checked} defaults were compared");
}

/// Every metric the worker exports is in OPERATIONS' metrics table, and the
/// table names no metric the worker does not export.
#[test]
fn the_operations_metrics_table_is_the_worker_metrics() {
    let source = file("src/telemetry/metrics.rs");
    let exported: BTreeSet<String> = source
        .split('"')
        .filter(|s| s.starts_with("profile_worker_") && !s.contains(' '))
        .map(String::from)
        .collect();
    assert!(exported.len() > 10, "{exported:?}");
    let documented: BTreeSet<String> = file("docs/OPERATIONS.md")
        .lines()
        .filter_map(|l| l.strip_prefix("| `profile_worker_"))
        .filter_map(|l| l.split('`').next())
        .map(|rest| format!("profile_worker_{rest}"))
        .collect();
    assert_eq!(exported, documented);
}
