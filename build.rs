//! The embedded migrations, listed from `migrations/` at build time: a file
//! named `NNNN_name.sql` is migration NNNN, so adding one is adding the file.

use std::fmt::Write;

fn main() {
    println!("cargo:rerun-if-changed=migrations");
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("migrations");
    let mut files: Vec<(u32, String, String)> = std::fs::read_dir(&dir)
        .expect("migrations/")
        .map(|e| e.expect("a directory entry").path())
        .filter(|p| p.extension().is_some_and(|x| x == "sql"))
        .map(|p| {
            let stem = p.file_stem().unwrap().to_string_lossy().into_owned();
            let (version, name) = stem
                .split_once('_')
                .unwrap_or_else(|| panic!("{stem}.sql: migrations are named NNNN_name.sql"));
            let version: u32 = version
                .parse()
                .unwrap_or_else(|_| panic!("{stem}.sql: migrations are named NNNN_name.sql"));
            (version, name.to_string(), p.display().to_string())
        })
        .collect();
    files.sort();
    for (i, (v, name, _)) in files.iter().enumerate() {
        assert_eq!(
            *v as usize,
            i + 1,
            "migration {name}: versions run 1, 2, 3… without gaps"
        );
    }
    let mut out = String::from("&[\n");
    for (v, name, path) in &files {
        writeln!(
            out,
            "    Migration {{ version: {v}, name: {name:?}, sql: include_str!({path:?}) }},"
        )
        .unwrap();
    }
    out.push(']');
    let target = std::path::Path::new(&std::env::var("OUT_DIR").unwrap()).join("migrations.rs");
    std::fs::write(target, out).expect("OUT_DIR/migrations.rs");
}
