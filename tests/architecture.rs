//! The module map stays true: ARCHITECTURE.md's table of modules ("| `module` | concept | depends on |")
//! is the import rule, and this test reads it and every file under `src/` (the CLI in `src/bin` is a
//! separate crate that sees only the public API).
//!
//! - every module of the crate has a row, and every row names a module that exists;
//! - the declared dependencies form no cycle;
//! - a module imports (`crate::x`, `crate::{x, y}`, or `super::` out of a nested module with its own row)
//!   only itself and what its declared dependencies reach, transitively: never a module above it or beside
//!   it. The umbrella `crate::Error` / `crate::Result` live at the top (`lib.rs`), so no module imports them.
//!
//! Comments and `#[cfg(test)]` sections are not imports: unit tests may use any module.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

const ROOT: &str = env!("CARGO_MANIFEST_DIR");

/// The table: module -> declared dependencies.
fn table() -> BTreeMap<String, BTreeSet<String>> {
    let md = std::fs::read_to_string(Path::new(ROOT).join("ARCHITECTURE.md")).unwrap();
    let mut rows = BTreeMap::new();
    for line in md.lines() {
        let cells: Vec<&str> = line.split('|').map(str::trim).collect();
        // "| `m` | concept | deps |" splits into ["", "`m`", concept..., deps, ""].
        if cells.len() < 5 || !cells[1].starts_with('`') || !cells[1].ends_with('`') {
            continue;
        }
        let name = cells[1].trim_matches('`').to_string();
        if name == "bin/peftdb" || name == "module" {
            continue;
        }
        let deps_cell = cells[cells.len() - 2];
        let deps: BTreeSet<String> = deps_cell
            .split(',')
            // "store" or "experiment (its results file)": the first word names the module.
            .map(|d| {
                let w = d.trim().split([' ', '(']).next().unwrap_or("");
                w.trim_matches('`').to_string()
            })
            .filter(|d| !d.is_empty() && d != "-")
            .collect();
        rows.insert(name, deps);
    }
    rows
}

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            if p.file_name().unwrap() != "bin" {
                rust_files(&p, out);
            }
        } else if p.extension().is_some_and(|x| x == "rs") {
            out.push(p);
        }
    }
}

/// The row a source file belongs to: the longest `a::b` row matching its path (`src/a/b.rs` or
/// `src/a/b/...`), else its top-level module; `lib` for `src/lib.rs`.
fn module_of(rel: &Path, rows: &BTreeMap<String, BTreeSet<String>>) -> String {
    let mut parts: Vec<String> = rel
        .iter()
        .map(|c| c.to_string_lossy().trim_end_matches(".rs").to_string())
        .collect();
    if parts.last().is_some_and(|l| l == "mod") {
        parts.pop();
    }
    for n in (1..=parts.len()).rev() {
        let name = parts[..n].join("::");
        if rows.contains_key(&name) {
            return name;
        }
    }
    parts[0].clone()
}

/// Code without comments and without the unit tests at the end of the file.
fn code_of(src: &str) -> String {
    let body = src.split("#[cfg(test)]").next().unwrap_or("");
    body.lines()
        .filter(|l| !l.trim_start().starts_with("//"))
        .collect::<Vec<_>>()
        .join("\n")
}

/// Identifiers following `prefix` (`crate::x` -> x; `crate::{x, y::z}` -> x, y).
fn names_after(code: &str, prefix: &str) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    let ident = |s: &str| -> String {
        s.chars()
            .take_while(|c| c.is_alphanumeric() || *c == '_')
            .collect()
    };
    for (i, _) in code.match_indices(prefix) {
        // Not the tail of a longer path (`foo::crate::` does not occur; `$crate::` in macros is fine).
        let rest = &code[i + prefix.len()..];
        if let Some(group) = rest.strip_prefix('{') {
            let mut depth = 0;
            let mut item = String::new();
            for c in group.chars() {
                match c {
                    '{' => depth += 1,
                    '}' if depth == 0 => break,
                    '}' => depth -= 1,
                    _ => {}
                }
                if depth == 0 && c == ',' {
                    out.insert(ident(item.trim()));
                    item.clear();
                } else if depth == 0 || c != '{' {
                    item.push(c);
                }
            }
            out.insert(ident(item.trim()));
        } else {
            out.insert(ident(rest));
        }
    }
    out.retain(|s| !s.is_empty() && s != "self");
    out
}

/// The module an imported crate-root name belongs to (`Error`/`Result` are the umbrella in `lib.rs`).
fn target_module(name: &str) -> String {
    match name {
        "Error" | "Result" => "lib".into(),
        other => other.to_string(),
    }
}

fn closure(m: &str, rows: &BTreeMap<String, BTreeSet<String>>) -> BTreeSet<String> {
    let mut seen = BTreeSet::new();
    let mut stack = vec![m.to_string()];
    while let Some(x) = stack.pop() {
        for d in rows.get(&x).into_iter().flatten() {
            if seen.insert(d.clone()) {
                stack.push(d.clone());
            }
        }
    }
    seen
}

#[test]
fn every_module_imports_only_what_the_map_allows() {
    let rows = table();
    assert!(rows.len() >= 10, "ARCHITECTURE.md's module table not found");
    let src = Path::new(ROOT).join("src");
    let mut files = Vec::new();
    rust_files(&src, &mut files);
    files.sort();

    // Every module has a row; every row exists.
    let mut seen_modules = BTreeSet::new();
    for f in &files {
        let m = module_of(f.strip_prefix(&src).unwrap(), &rows);
        if m != "lib" {
            assert!(
                rows.contains_key(&m),
                "{}: module `{m}` has no row in ARCHITECTURE.md's module table",
                f.display()
            );
        }
        seen_modules.insert(m);
    }
    for r in rows.keys() {
        assert!(
            seen_modules.contains(r),
            "ARCHITECTURE.md names module `{r}`, which has no source file"
        );
        for d in &rows[r] {
            assert!(
                rows.contains_key(d),
                "row `{r}` depends on unknown module `{d}`"
            );
        }
    }
    // No cycle among the declared dependencies.
    for r in rows.keys() {
        assert!(
            !closure(r, &rows).contains(r),
            "ARCHITECTURE.md's dependencies have a cycle through `{r}`"
        );
    }

    // Every import allowed.
    let mut violations = Vec::new();
    for f in &files {
        let rel = f.strip_prefix(&src).unwrap();
        let m = module_of(rel, &rows);
        if m == "lib" {
            continue;
        }
        let code = code_of(&std::fs::read_to_string(f).unwrap());
        let mut imported: BTreeSet<String> = names_after(&code, "crate::")
            .iter()
            .map(|n| target_module(n))
            .collect();
        // `super::` out of a nested row (experiment::transfer -> experiment) is an import of the parent.
        if let Some((parent, _)) = m.rsplit_once("::") {
            let depth_in_row = rel.components().count() - m.split("::").count();
            if depth_in_row == 0 && !names_after(&code, "super::").is_empty() {
                imported.insert(parent.to_string());
            }
        }
        let allowed = closure(&m, &rows);
        for i in imported {
            // `crate::x` inside module x, or a nested row's own parent path prefix, is itself.
            if i == m || m.starts_with(&format!("{i}::")) && allowed.contains(&i) {
                continue;
            }
            if i == m.split("::").next().unwrap() && !rows.contains_key(&i) {
                continue;
            }
            if !allowed.contains(&i) {
                violations.push(format!(
                    "{}: module `{m}` imports `{i}`, which ARCHITECTURE.md does not let it depend on (allowed: {:?})",
                    f.display(),
                    allowed
                ));
            }
        }
    }
    assert!(violations.is_empty(), "{}", violations.join("\n"));
}

#[test]
fn the_parser_reads_imports() {
    let code = "use crate::{object::{Tensor, DType}, embed};\nuse crate::store::Store;\nlet x = crate::Error::from(e);";
    let got = names_after(code, "crate::");
    let want: BTreeSet<String> = ["object", "embed", "store", "Error"]
        .iter()
        .map(|s| s.to_string())
        .collect();
    assert_eq!(got, want);
    assert_eq!(
        code_of("use crate::a;\n// use crate::b;\n#[cfg(test)]\nuse crate::c;"),
        "use crate::a;"
    );
}
