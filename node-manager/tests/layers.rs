//! The crate's layering, read from its sources: imports point one way only.
//!
//! - `kernel/` imports only `model` (and itself): object loading, pins, maps, attach and probes
//!   know nothing of features, the agent or the sources;
//! - no import circle anywhere: at every folder level, the sibling modules' imports form no
//!   cycle (a module may use its parent, which declares it).
//!
//! Every `crate::…` path in `use` lines and in code counts, `super::…` too.
use std::{
    collections::{BTreeMap, BTreeSet},
    fs,
    path::{Path, PathBuf},
};

type Module = Vec<String>;

fn src() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("src")
}

/// Every source file of the library and the module path it defines.
fn modules() -> BTreeMap<Module, String> {
    fn walk(dir: &Path, prefix: &[String], out: &mut BTreeMap<Module, String>) {
        for entry in fs::read_dir(dir).unwrap().flatten() {
            let path = entry.path();
            let name = path.file_stem().unwrap().to_string_lossy().into_owned();
            if path.is_dir() {
                walk(&path, &[prefix, &[name]].concat(), out);
            } else if path.extension().is_some_and(|e| e == "rs") {
                let module = match name.as_str() {
                    "lib" | "main" | "mod" => prefix.to_vec(),
                    _ => [prefix, std::slice::from_ref(&name)].concat(),
                };
                if name != "main" {
                    out.insert(module, fs::read_to_string(&path).unwrap());
                }
            }
        }
    }
    let mut out = BTreeMap::new();
    walk(&src(), &[], &mut out);
    out
}

/// Paths in a `use` tree (`a::{b, c::{d}}` → `a::b`, `a::c::d`).
fn expand(tree: &str) -> Vec<Vec<String>> {
    let tree = tree.trim();
    let Some(open) = tree.find('{') else {
        let path = tree.split(" as ").next().unwrap();
        return vec![path.split("::").map(str::trim).filter(|s| !s.is_empty()).map(str::to_owned).collect()];
    };
    let head: Vec<String> =
        tree[..open].split("::").map(str::trim).filter(|s| !s.is_empty()).map(str::to_owned).collect();
    let inner = &tree[open + 1..tree.rfind('}').unwrap()];
    let (mut items, mut depth, mut start) = (Vec::new(), 0, 0);
    for (i, c) in inner.char_indices() {
        match c {
            '{' => depth += 1,
            '}' => depth -= 1,
            ',' if depth == 0 => {
                items.push(&inner[start..i]);
                start = i + 1;
            }
            _ => {}
        }
    }
    items.push(&inner[start..]);
    items
        .into_iter()
        .filter(|i| !i.trim().is_empty())
        .flat_map(expand)
        .map(|tail| [head.clone(), tail].concat())
        .collect()
}

/// The code without comments (doc comments mention paths that are not imports).
fn code(text: &str) -> String {
    text.lines().map(|l| l.split("//").next().unwrap()).collect::<Vec<_>>().join("\n")
}

/// Every path a module refers to through `crate::` or `super::`, made absolute.
fn references(module: &Module, text: &str) -> Vec<Module> {
    let text = code(text);
    let mut found = Vec::new();
    for root in ["crate::", "super::"] {
        for (at, _) in text.match_indices(root) {
            if at > 0 && text[..at].ends_with(|c: char| c.is_alphanumeric() || c == '_' || c == ':') {
                continue; // `super::` inside `crate::a::super::` or `self::super::`
            }
            let rest = &text[at + root.len()..];
            // A use tree runs to the `;`; an inline path to the first character outside it.
            let tree = if text[..at].trim_end().ends_with("use") {
                &rest[..rest.find(';').unwrap_or(rest.len())]
            } else {
                let end = rest.find(|c: char| !(c.is_alphanumeric() || c == '_' || c == ':')).unwrap_or(rest.len());
                &rest[..end]
            };
            let base: Module = if root == "crate::" {
                Vec::new()
            } else {
                // `super` of `a::b` (a/b.rs, or a/b/mod.rs) is `a`.
                module[..module.len().saturating_sub(1)].to_vec()
            };
            for path in expand(tree) {
                found.push([base.clone(), path].concat());
            }
        }
    }
    found
}

/// The longest known module a path names.
fn resolve(path: &Module, known: &BTreeSet<Module>) -> Module {
    (0..=path.len()).rev().map(|n| path[..n].to_vec()).find(|p| known.contains(p)).unwrap_or_default()
}

/// (from, to) between distinct modules, as written.
fn edges() -> BTreeSet<(Module, Module)> {
    let modules = modules();
    let known: BTreeSet<Module> = modules.keys().cloned().collect();
    let mut edges = BTreeSet::new();
    for (module, text) in &modules {
        for path in references(module, text) {
            let to = resolve(&path, &known);
            if &to != module {
                edges.insert((module.clone(), to));
            }
        }
    }
    edges
}

fn show(m: &Module) -> String {
    if m.is_empty() { "crate".to_owned() } else { m.join("::") }
}

#[test]
fn the_kernel_layer_imports_only_model_types() {
    let bad: Vec<String> = edges()
        .into_iter()
        .filter(|(from, _)| from.first().is_some_and(|f| f == "kernel"))
        .filter(|(_, to)| !matches!(to.first().map(String::as_str), Some("kernel" | "model")))
        .map(|(from, to)| format!("{} uses {}", show(&from), show(&to)))
        .collect();
    assert!(bad.is_empty(), "kernel/ may import only crate::model and itself:\n{}", bad.join("\n"));
}

#[test]
fn no_import_circle_at_any_level() {
    // Lift each edge to the two siblings under the modules' common parent; an edge to an
    // ancestor (the parent that declares a module) is not a layer crossing.
    let mut graph: BTreeMap<Module, BTreeSet<Module>> = BTreeMap::new();
    for (from, to) in edges() {
        let common = from.iter().zip(&to).take_while(|(a, b)| a == b).count();
        if common == from.len() || common == to.len() {
            continue;
        }
        graph.entry(from[..=common].to_vec()).or_default().insert(to[..=common].to_vec());
    }
    // Depth-first search for a back edge; the cycle is named.
    fn visit(
        node: &Module,
        graph: &BTreeMap<Module, BTreeSet<Module>>,
        stack: &mut Vec<Module>,
        done: &mut BTreeSet<Module>,
    ) -> Option<Vec<Module>> {
        if let Some(at) = stack.iter().position(|n| n == node) {
            return Some([&stack[at..], std::slice::from_ref(node)].concat());
        }
        if !done.insert(node.clone()) {
            return None;
        }
        stack.push(node.clone());
        for next in graph.get(node).into_iter().flatten() {
            if let Some(cycle) = visit(next, graph, stack, done) {
                return Some(cycle);
            }
        }
        stack.pop();
        None
    }
    let mut done = BTreeSet::new();
    for node in graph.keys() {
        if let Some(cycle) = visit(node, &graph, &mut Vec::new(), &mut done) {
            panic!("import circle: {}", cycle.iter().map(show).collect::<Vec<_>>().join(" → "));
        }
    }
    // The checker sees the crate's real imports (so it cannot pass by reading nothing).
    assert!(graph.get(&vec!["agent".to_owned()]).is_some_and(|to| to.contains(&vec!["kernel".to_owned()])));
    assert!(graph.values().map(BTreeSet::len).sum::<usize>() > 20, "{graph:?}");
}

#[test]
fn the_checker_finds_a_circle_and_a_kernel_import_when_there_is_one() {
    let m = |s: &str| s.split("::").map(str::to_owned).collect::<Module>();
    assert_eq!(expand("a::{b, c::{d, e as f}}"), vec![m("a::b"), m("a::c::d"), m("a::c::e")]);
    let refs = references(
        &m("kernel::probe"),
        "use crate::{features::drop_invalid::{self, Mode}, model};\nlet x = super::sys::f();",
    );
    assert!(refs.contains(&m("features::drop_invalid::self")) && refs.contains(&m("kernel::sys::f")), "{refs:?}");
    let known: BTreeSet<Module> = [m("features::drop_invalid"), m("kernel::sys")].into();
    assert_eq!(resolve(&m("features::drop_invalid::self"), &known), m("features::drop_invalid"));
    assert_eq!(resolve(&m("kernel::sys::f"), &known), m("kernel::sys"));
}
