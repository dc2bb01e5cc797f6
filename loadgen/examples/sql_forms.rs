//! Which form of passing a batch's rows to PostgreSQL costs least
//! (bench/archive/BENCHMARKS-to-2026-12-07.md, "Typed batch SQL"; raw
//! bench/archive/sql-forms.txt): one array per column (`unnest` of several
//! arrays, as the worker's commit did), one array of a composite type per
//! table (as it does now), or one jsonb document per table
//! (`jsonb_to_recordset`). The same rows into the same unlogged table over one
//! connection, the three forms alternated; it
//! reports each form's median time per statement and the CPU per statement of
//! this process and of the server's backend (from /proc, so on this machine).
//!
//! `DATABASE_URL=postgres://…/db cargo run --release -p profile-worker-bench
//! --example sql_forms -- ROWS REPEATS` (the role may create a type and a
//! table in `db`; both are dropped afterwards).
use postgres_types::ToSql;
use std::time::Instant;
use uuid::Uuid;

#[derive(Debug, ToSql)]
#[postgres(name = "sqlforms_ticket_row")]
struct TicketRow<'a> {
    n: i32,
    id: Uuid,
    tenant: &'a str,
    profile_id: &'a str,
    last_request_time: std::time::SystemTime,
    body: &'a str,
}

#[derive(serde::Serialize)]
struct JsonRow<'a> {
    n: i32,
    id: Uuid,
    tenant: &'a str,
    profile_id: &'a str,
    last_request_time: String,
    body: &'a str,
}

fn cpu_secs(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    let rest = &stat[stat.rfind(')').unwrap() + 2..];
    let f: Vec<&str> = rest.split(' ').collect();
    let (u, s): (f64, f64) = (f[11].parse().unwrap(), f[12].parse().unwrap());
    (u + s) / 100.0
}

#[tokio::main]
async fn main() {
    let url = std::env::var("DATABASE_URL").unwrap();
    let rows_per: usize = std::env::args().nth(1).map_or(250, |a| a.parse().unwrap());
    let reps: usize = std::env::args().nth(2).map_or(400, |a| a.parse().unwrap());
    let (c, conn) = tokio_postgres::connect(&url, tokio_postgres::NoTls)
        .await
        .unwrap();
    tokio::spawn(conn);
    c.batch_execute(
        "DROP TABLE IF EXISTS sqlforms_t; DROP TYPE IF EXISTS sqlforms_ticket_row;
         CREATE TYPE sqlforms_ticket_row AS (n int4, id uuid, tenant text, profile_id text, last_request_time timestamptz, body text);
         CREATE UNLOGGED TABLE sqlforms_t (id uuid PRIMARY KEY, tenant text, profile_id text, last_request_time timestamptz, body text);",
    )
    .await
    .unwrap();
    let backend: i32 = c
        .query_one("SELECT pg_backend_pid()", &[])
        .await
        .unwrap()
        .get(0);
    let body = r#"{"tenant":"default","profileId":"5925a68def86951f895cf497","idSha256":"ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"}"#;
    let columns = c.prepare("INSERT INTO sqlforms_t SELECT x.id, x.tenant, x.profile_id, x.at, x.body FROM unnest($1::uuid[], $2::text[], $3::text[], $4::timestamptz[], $5::text[], $6::int4[]) AS x(id, tenant, profile_id, at, body, n)").await.unwrap();
    let composite = c.prepare("INSERT INTO sqlforms_t SELECT x.id, x.tenant, x.profile_id, x.last_request_time, x.body FROM unnest($1::sqlforms_ticket_row[]) x").await.unwrap();
    let json = c.prepare("INSERT INTO sqlforms_t SELECT x.id, x.tenant, x.profile_id, x.last_request_time, x.body FROM jsonb_to_recordset($1::jsonb) AS x(n int4, id uuid, tenant text, profile_id text, last_request_time timestamptz, body text)").await.unwrap();
    let names = ["columns", "composite", "jsonb"];
    let mut wall = [Vec::new(), Vec::new(), Vec::new()];
    let mut client_cpu = [0.0f64; 3];
    let mut server_cpu = [0.0f64; 3];
    let me = std::process::id();
    for rep in 0..reps {
        for form in 0..3 {
            let ids: Vec<Uuid> = (0..rows_per).map(|_| Uuid::new_v4()).collect();
            let now = std::time::SystemTime::now();
            let (c0, s0) = (cpu_secs(me), cpu_secs(backend as u32));
            let t = Instant::now();
            match form {
                0 => {
                    let tenants: Vec<&str> = ids.iter().map(|_| "default").collect();
                    let profiles: Vec<&str> =
                        ids.iter().map(|_| "5925a68def86951f895cf497").collect();
                    let times: Vec<std::time::SystemTime> = ids.iter().map(|_| now).collect();
                    let bodies: Vec<&str> = ids.iter().map(|_| body).collect();
                    let ns: Vec<i32> = (0..rows_per as i32).collect();
                    c.execute(&columns, &[&ids, &tenants, &profiles, &times, &bodies, &ns])
                        .await
                        .unwrap();
                }
                1 => {
                    let rows: Vec<TicketRow> = ids
                        .iter()
                        .enumerate()
                        .map(|(n, id)| TicketRow {
                            n: n as i32,
                            id: *id,
                            tenant: "default",
                            profile_id: "5925a68def86951f895cf497",
                            last_request_time: now,
                            body,
                        })
                        .collect();
                    c.execute(&composite, &[&rows]).await.unwrap();
                }
                _ => {
                    let rows: Vec<JsonRow> = ids
                        .iter()
                        .enumerate()
                        .map(|(n, id)| JsonRow {
                            n: n as i32,
                            id: *id,
                            tenant: "default",
                            profile_id: "5925a68def86951f895cf497",
                            last_request_time: "2026-12-06T05:00:00.123Z".into(),
                            body,
                        })
                        .collect();
                    let doc = serde_json::to_value(&rows).unwrap();
                    c.execute(&json, &[&doc]).await.unwrap();
                }
            }
            let took = t.elapsed();
            let (c1, s1) = (cpu_secs(me), cpu_secs(backend as u32));
            if rep >= reps / 10 {
                wall[form].push(took);
                client_cpu[form] += c1 - c0;
                server_cpu[form] += s1 - s0;
            }
        }
        if rep % 50 == 0 {
            c.batch_execute("TRUNCATE sqlforms_t").await.unwrap();
        }
    }
    c.batch_execute("DROP TABLE sqlforms_t; DROP TYPE sqlforms_ticket_row;")
        .await
        .unwrap();
    println!(
        "{rows_per} rows per statement, {} measured statements per form, alternated",
        wall[0].len()
    );
    for f in 0..3 {
        wall[f].sort();
        let med = wall[f][wall[f].len() / 2];
        let n = wall[f].len() as f64;
        println!(
            "{:<10} median {:>8.3} ms   client CPU {:>7.3} ms/stmt   server CPU {:>7.3} ms/stmt",
            names[f],
            med.as_secs_f64() * 1e3,
            client_cpu[f] / n * 1e3,
            server_cpu[f] / n * 1e3
        );
    }
}
