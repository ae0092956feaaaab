//! Loading a pipeline file: schema checks, `${...}` resolution, fan-out and the DAG.

use std::collections::{BTreeMap, HashMap};
use std::path::{Component, Path, PathBuf};

use anneal_cache::LinkMode;
use anneal_stages::Stage;
use petgraph::graph::{DiGraph, NodeIndex};
use petgraph::visit::EdgeRef;

use crate::diag::{Diags, Reporter, did_you_mean};
use crate::interp::{Lookup, RVal, RefError, Seg, resolve};
use crate::yaml::{self, Mark, Node, Scalar, Yaml};

const TOP_KEYS: &[&str] = &["name", "vars", "stages", "secret_env", "store"];
const STAGE_KEYS: &[&str] = &[
    "kind",
    "deps",
    "outs",
    "params",
    "resources",
    "foreach",
    "matrix",
    "desc",
];
const STORE_KEYS: &[&str] = &["dir", "link"];
const RESOURCE_KEYS: &[&str] = &["cpus", "gpus"];

/// A loaded, fully resolved pipeline.
pub struct Pipeline {
    /// `name:` or the file stem.
    pub name: String,
    /// The pipeline file as given on the command line.
    pub file: PathBuf,
    /// The file's directory (absolute): stages run here and paths are relative to it.
    pub dir: PathBuf,
    /// The store directory (absolute).
    pub store_dir: PathBuf,
    /// How outputs are placed in the workspace.
    pub link: LinkMode,
    /// Stages, fan-out instances expanded in place, in file order.
    pub stages: Vec<StageSpec>,
    /// Edges run from upstream to downstream; node `i` is `stages[i]`.
    pub graph: DiGraph<usize, Mark>,
    /// A topological order, stable with respect to file order.
    pub order: Vec<usize>,
    src: String,
}

/// One concrete stage.
pub struct StageSpec {
    /// Its name (`train@lr=1e-5` for a fan-out instance).
    pub name: String,
    /// The name under `stages:` it was generated from.
    pub base: String,
    /// Where it is declared.
    pub mark: Mark,
    /// Its kind.
    pub kind: &'static dyn Stage,
    /// `desc:`.
    pub desc: Option<String>,
    /// Inputs, including implicit ones for `${stages...}` used outside `deps`.
    pub deps: BTreeMap<String, DepSpec>,
    /// Outputs.
    pub outs: BTreeMap<String, OutSpec>,
    /// `params:` (a mapping).
    pub params: RVal,
    /// Kind-specific keys.
    pub config: BTreeMap<String, RVal>,
    /// CPUs it occupies while running.
    pub cpus: u32,
    /// GPUs it needs.
    pub gpus: u32,
    /// Environment variables holding secrets that it uses.
    pub secrets: Vec<String>,
}

/// A declared input.
#[derive(Clone, Debug)]
pub struct DepSpec {
    /// Path relative to the pipeline directory (or absolute), as declared.
    pub path: String,
    /// The stage output it is, if any: (stage index, output name).
    pub from: Option<(usize, String)>,
    /// Where it is declared.
    pub mark: Mark,
}

/// A declared output.
#[derive(Clone, Debug)]
pub struct OutSpec {
    /// Path relative to the pipeline directory, normalised, without trailing `/`.
    pub path: String,
    /// Declared with a trailing `/`.
    pub dir: bool,
    /// Where it is declared.
    pub mark: Mark,
}

impl Pipeline {
    /// Reads and resolves a pipeline file. `store` overrides `store.dir`.
    pub fn load(file: &Path, store: Option<&Path>) -> anyhow::Result<Pipeline> {
        let mut src = std::fs::read_to_string(file)
            .map_err(|e| anyhow::anyhow!("cannot read pipeline file {}: {e}", file.display()))?;
        // Editors on Windows may start the file with a byte-order mark.
        if let Some(rest) = src.strip_prefix('\u{feff}') {
            src = rest.to_owned();
        }
        let abs = std::path::absolute(file)?;
        let dir = abs
            .parent()
            .map(Path::to_path_buf)
            .unwrap_or_else(|| PathBuf::from("."));
        let mut rep = Reporter::new(file, &src);
        let loaded = Loader::new(&mut rep).load(&src, file);
        rep.finish()?;
        let mut l = loaded
            .ok_or_else(|| anyhow::anyhow!("{}: could not load the pipeline", file.display()))?;
        let store_dir = match store {
            Some(s) => std::path::absolute(s)?,
            None => dir.join(l.store_dir.as_deref().unwrap_or(".anneal")),
        };
        let name = l.name.take().unwrap_or_else(|| {
            file.file_stem()
                .map(|s| s.to_string_lossy().into_owned())
                .unwrap_or_default()
        });
        let mut p = Pipeline {
            name,
            file: file.to_path_buf(),
            dir,
            store_dir,
            link: l.link,
            stages: l.stages,
            graph: DiGraph::new(),
            order: Vec::new(),
            src,
        };
        p.check_out_paths()?;
        p.build_graph()?;
        Ok(p)
    }

    /// Index of the stage called `name`.
    pub fn index(&self, name: &str) -> Option<usize> {
        self.stages.iter().position(|s| s.name == name)
    }

    /// Stage indices matching `name`: one stage, or every instance of a fan-out.
    pub fn select(&self, name: &str) -> anyhow::Result<Vec<usize>> {
        let hits: Vec<usize> = (0..self.stages.len())
            .filter(|&i| self.stages[i].name == name || self.stages[i].base == name)
            .collect();
        if hits.is_empty() {
            let names: Vec<&str> = self.stages.iter().map(|s| s.name.as_str()).collect();
            let help = did_you_mean(name, &names)
                .map(|h| format!("\n  help: {h}"))
                .unwrap_or_default();
            anyhow::bail!("no stage '{name}' in {}{help}", self.file.display());
        }
        Ok(hits)
    }

    /// Direct upstream stages of `i`.
    pub fn upstream(&self, i: usize) -> Vec<usize> {
        let mut v: Vec<usize> = self
            .graph
            .edges_directed(NodeIndex::new(i), petgraph::Direction::Incoming)
            .map(|e| e.source().index())
            .collect();
        v.sort_unstable();
        v.dedup();
        v
    }

    /// Direct downstream stages of `i`.
    pub fn downstream(&self, i: usize) -> Vec<usize> {
        let mut v: Vec<usize> = self
            .graph
            .edges_directed(NodeIndex::new(i), petgraph::Direction::Outgoing)
            .map(|e| e.target().index())
            .collect();
        v.sort_unstable();
        v.dedup();
        v
    }

    /// `targets` and everything upstream of them.
    pub fn with_ancestors(&self, targets: &[usize]) -> Vec<bool> {
        let mut keep = vec![false; self.stages.len()];
        let mut todo = targets.to_vec();
        while let Some(i) = todo.pop() {
            if !keep[i] {
                keep[i] = true;
                todo.extend(self.upstream(i));
            }
        }
        keep
    }

    /// A located error about something declared at `mark`.
    pub fn error_at(
        &self,
        mark: Mark,
        message: impl Into<String>,
        help: Option<String>,
    ) -> anyhow::Error {
        let mut rep = Reporter::new(&self.file, &self.src);
        rep.error(mark, message, help);
        match rep.finish() {
            Err(d) => d.into(),
            Ok(()) => anyhow::anyhow!("internal error"),
        }
    }

    /// Refuses outputs that would overwrite what anneal does not own: the
    /// store, the pipeline file, another stage's (or the same stage's) file
    /// inputs, or a place outside the project reached through a symlink.
    fn check_out_paths(&self) -> anyhow::Result<()> {
        let real_dir = resolve_existing(&self.dir);
        let real_store = resolve_existing(&self.store_dir);
        let file = resolve_existing(&std::path::absolute(&self.file)?);
        let nested = |a: &Path, b: &Path| a.starts_with(b) || b.starts_with(a);
        // Plain file inputs, resolved once: (stage, input name, spec, real path).
        let file_deps: Vec<_> = self
            .stages
            .iter()
            .flat_map(|t| t.deps.iter().map(move |(n, d)| (t, n, d)))
            .filter(|(_, _, d)| d.from.is_none() && !d.path.is_empty())
            .map(|(t, n, d)| (t, n, d, resolve_existing(&self.dir.join(&d.path))))
            .collect();
        for s in &self.stages {
            for (name, o) in &s.outs {
                let p = self.dir.join(&o.path);
                let real = resolve_existing(&p);
                let what = format!("output '{name}' of stage '{}' ({})", s.name, o.path);
                if !real.starts_with(&real_dir) {
                    return Err(self.error_at(
                        o.mark,
                        format!(
                            "{what} resolves through a symlink to {}, outside the pipeline directory",
                            real.display()
                        ),
                        Some("write outputs to a real path inside the pipeline directory".into()),
                    ));
                }
                if nested(&real, &real_store) {
                    return Err(self.error_at(
                        o.mark,
                        format!("{what} overlaps the store {}", self.store_dir.display()),
                        Some("write outputs outside the store directory".into()),
                    ));
                }
                if file.starts_with(&real) {
                    return Err(self.error_at(
                        o.mark,
                        format!(
                            "{what} would overwrite the pipeline file {}",
                            self.file.display()
                        ),
                        Some("write outputs to a path of their own".into()),
                    ));
                }
                if let Some((t, dname, d, _)) = file_deps.iter().find(|f| nested(&f.3, &real)) {
                    let whose = if t.name == s.name {
                        "its own".to_owned()
                    } else {
                        format!("stage '{}''s", t.name)
                    };
                    return Err(self.error_at(
                        d.mark,
                        format!(
                            "input deps.{dname} ({}) of stage '{}' overlaps {what}: running '{}' would replace {whose} input",
                            d.path, t.name, s.name
                        ),
                        Some(format!(
                            "give the output a path of its own, or depend on the whole output with ${{stages.{}.outs.{name}}}",
                            s.name
                        )),
                    ));
                }
            }
        }
        Ok(())
    }

    fn build_graph(&mut self) -> Result<(), Diags> {
        let n = self.stages.len();
        let mut g: DiGraph<usize, Mark> = DiGraph::with_capacity(n, n);
        for i in 0..n {
            g.add_node(i);
        }
        for (i, s) in self.stages.iter().enumerate() {
            for d in s.deps.values() {
                if let Some((up, _)) = &d.from {
                    g.add_edge(NodeIndex::new(*up), NodeIndex::new(i), d.mark);
                }
            }
        }
        // Kahn's algorithm, always taking the lowest index, so the order follows the file.
        let mut indeg: Vec<usize> = (0..n)
            .map(|i| {
                g.edges_directed(NodeIndex::new(i), petgraph::Direction::Incoming)
                    .count()
            })
            .collect();
        let mut ready: std::collections::BTreeSet<usize> =
            (0..n).filter(|&i| indeg[i] == 0).collect();
        let mut order = Vec::with_capacity(n);
        while let Some(i) = ready.pop_first() {
            order.push(i);
            for e in g.edges_directed(NodeIndex::new(i), petgraph::Direction::Outgoing) {
                let t = e.target().index();
                indeg[t] -= 1;
                if indeg[t] == 0 {
                    ready.insert(t);
                }
            }
        }
        if order.len() < n {
            let cycle = find_cycle(&g, &indeg);
            let names: Vec<&str> = cycle
                .iter()
                .map(|&i| self.stages[i].name.as_str())
                .collect();
            let first = cycle[0];
            let second = cycle[1 % cycle.len()];
            let mark = g
                .edges_connecting(NodeIndex::new(first), NodeIndex::new(second))
                .next()
                .map(|e| *e.weight())
                .unwrap_or(self.stages[second].mark);
            let mut rep = Reporter::new(&self.file, &self.src);
            rep.error(
                mark,
                format!("cycle: {}", names.join(" -> ")),
                Some("a stage cannot depend, directly or not, on its own outputs; remove one of these references".into()),
            );
            return rep.finish();
        }
        self.graph = g;
        self.order = order;
        Ok(())
    }
}

/// A cycle among the nodes Kahn's algorithm could not order, as a closed path `a, b, ..., a`.
fn find_cycle(g: &DiGraph<usize, Mark>, indeg: &[usize]) -> Vec<usize> {
    let start = (0..indeg.len()).find(|&i| indeg[i] > 0).unwrap_or(0);
    // Walk backwards along incoming edges from unordered nodes until a node repeats.
    let mut seen: HashMap<usize, usize> = HashMap::new();
    let mut path = vec![start];
    let mut cur = start;
    loop {
        seen.insert(cur, path.len() - 1);
        let prev = g
            .edges_directed(NodeIndex::new(cur), petgraph::Direction::Incoming)
            .map(|e| e.source().index())
            .filter(|&s| indeg[s] > 0)
            .min()
            .unwrap_or(cur);
        if let Some(&pos) = seen.get(&prev) {
            let mut cyc: Vec<usize> = path[pos..].to_vec();
            cyc.push(prev);
            cyc.reverse();
            // Start the cycle at its lowest index for a stable message.
            cyc.pop();
            let k = cyc
                .iter()
                .enumerate()
                .min_by_key(|(_, v)| **v)
                .map(|(i, _)| i)
                .unwrap_or(0);
            cyc.rotate_left(k);
            cyc.push(cyc[0]);
            return cyc;
        }
        path.push(prev);
        cur = prev;
    }
}

/// Whether an environment variable's value must never be written anywhere.
fn is_secret_name(name: &str, declared: &[String]) -> bool {
    if declared.iter().any(|d| d == name) {
        return true;
    }
    let up = name.to_ascii_uppercase();
    ["KEY", "TOKEN", "SECRET", "PASSWORD"]
        .iter()
        .any(|w| up.contains(w))
}

struct Loaded {
    name: Option<String>,
    store_dir: Option<String>,
    link: LinkMode,
    stages: Vec<StageSpec>,
}

struct Loader<'r, 'a> {
    rep: &'r mut Reporter<'a>,
}

/// A stage as written, before fan-out.
struct StageDoc<'n> {
    name: String,
    mark: Mark,
    kind: &'static dyn Stage,
    fields: HashMap<&'n str, &'n Node>,
    config: Vec<(&'n str, &'n Node)>,
}

/// One fan-out instance's scope.
#[derive(Default, Clone)]
struct Item {
    suffix: Option<String>,
    item: Option<RVal>,
    key: Option<String>,
    matrix: Option<BTreeMap<String, RVal>>,
}

impl<'r, 'a> Loader<'r, 'a> {
    fn new(rep: &'r mut Reporter<'a>) -> Self {
        Loader { rep }
    }

    fn err_ref(&mut self, mark: Mark, e: RefError) {
        if e.msg.is_empty() {
            self.rep.suppressed = true;
        } else {
            self.rep.error_at(mark, e.msg, e.help, e.expr.as_deref());
        }
    }

    fn err(&mut self, mark: Mark, msg: impl Into<String>, help: Option<String>) {
        let msg = msg.into();
        // An empty message stands for an error already reported elsewhere.
        if msg.is_empty() {
            self.rep.suppressed = true;
        } else {
            self.rep.error(mark, msg, help);
        }
    }

    fn load(&mut self, src: &str, file: &Path) -> Option<Loaded> {
        let root = match yaml::parse(src) {
            Ok(Some(r)) => r,
            Ok(None) => {
                self.err(
                    Mark::default(),
                    "the pipeline file is empty",
                    Some("declare at least `stages:`".into()),
                );
                return None;
            }
            Err((mark, msg)) => {
                self.err(mark, format!("invalid YAML: {msg}"), None);
                return None;
            }
        };
        let Some(top) = root.as_map() else {
            self.err(
                root.mark,
                format!(
                    "a pipeline file must be a mapping, found {}",
                    root.type_name()
                ),
                None,
            );
            return None;
        };
        let mut fields: HashMap<&str, &Node> = HashMap::new();
        for (k, v) in top {
            let key = k.as_text().unwrap_or_default();
            if TOP_KEYS.contains(&key) {
                fields.insert(key, v);
            } else {
                self.err(
                    k.mark,
                    format!("unknown top-level key '{key}'"),
                    did_you_mean(key, TOP_KEYS),
                );
            }
        }
        let name = fields.get("name").and_then(|n| self.string(n, "name"));
        let secret_env: Vec<String> = match fields.get("secret_env") {
            None => Vec::new(),
            Some(n) => match &n.value {
                Yaml::Seq(items) => items
                    .iter()
                    .filter_map(|i| self.string(i, "secret_env item"))
                    .collect(),
                _ => {
                    self.err(
                        n.mark,
                        format!(
                            "'secret_env' must be a list of variable names, found {}",
                            n.type_name()
                        ),
                        None,
                    );
                    Vec::new()
                }
            },
        };
        let (store_dir, link) = fields
            .get("store")
            .map(|n| self.store(n))
            .unwrap_or_default();
        let vars = fields
            .get("vars")
            .map(|n| self.vars(n, &secret_env))
            .unwrap_or_default();
        let Some(stages_node) = fields.get("stages") else {
            self.err(
                root.mark,
                format!("{} declares no 'stages:'", file.display()),
                Some("add a `stages:` mapping of stage name -> stage".into()),
            );
            return None;
        };
        let Some(stage_entries) = stages_node.as_map() else {
            self.err(
                stages_node.mark,
                format!(
                    "'stages' must be a mapping of stage name -> stage, found {}",
                    stages_node.type_name()
                ),
                None,
            );
            return None;
        };
        let docs: Vec<StageDoc> = stage_entries
            .iter()
            .filter_map(|(k, v)| self.stage_doc(k, v))
            .collect();
        // Stages that failed to load were reported already; references to them should not be.
        let broken: Vec<String> = stage_entries
            .iter()
            .filter_map(|(k, _)| k.as_text())
            .filter(|n| !docs.iter().any(|d| d.name == *n))
            .map(str::to_owned)
            .collect();
        let env = EnvScope {
            secret_env: &secret_env,
        };
        // Expand fan-out and resolve outputs first: dependencies refer to them.
        let mut instances: Vec<(usize, Item, String)> = Vec::new();
        for (d, doc) in docs.iter().enumerate() {
            for item in self.fan_out(doc, &vars, &env) {
                let name = match &item.suffix {
                    Some(s) => format!("{}@{s}", doc.name),
                    None => doc.name.clone(),
                };
                if let Some((_, _, prev)) = instances.iter().find(|(_, _, n)| *n == name) {
                    let prev = prev.clone();
                    self.err(
                        doc.mark,
                        format!("stage name '{name}' is generated twice"),
                        Some(format!(
                            "'{prev}' already exists; make foreach/matrix values distinct"
                        )),
                    );
                    continue;
                }
                instances.push((d, item, name));
            }
        }
        let mut outs: Vec<BTreeMap<String, OutSpec>> = Vec::with_capacity(instances.len());
        for (d, item, name) in &instances {
            outs.push(self.outs(&docs[*d], item, name, &vars, &env));
        }
        self.check_out_overlap(&instances, &outs);
        let names: Vec<(String, String)> = instances
            .iter()
            .map(|(d, _, n)| (docs[*d].name.clone(), n.clone()))
            .collect();
        let index = StageIndex {
            names: &names,
            outs: &outs,
            broken: &broken,
        };
        let mut stages = Vec::with_capacity(instances.len());
        for (i, (d, item, name)) in instances.iter().enumerate() {
            if let Some(s) = self.stage(
                &docs[*d],
                i,
                item,
                name,
                &vars,
                &env,
                &index,
                outs[i].clone(),
            ) {
                stages.push(s);
            }
        }
        if self.rep.failed() {
            return None;
        }
        Some(Loaded {
            name,
            store_dir,
            link,
            stages,
        })
    }

    fn string(&mut self, n: &Node, what: &str) -> Option<String> {
        match n.scalar() {
            Some(Scalar::Str(s)) => Some(s),
            Some(Scalar::Num(x)) => Some(x.to_string()),
            _ => {
                self.err(
                    n.mark,
                    format!("'{what}' must be a string, found {}", n.type_name()),
                    None,
                );
                None
            }
        }
    }

    fn store(&mut self, n: &Node) -> (Option<String>, LinkMode) {
        let mut dir = None;
        let mut link = LinkMode::default();
        let Some(m) = n.as_map() else {
            self.err(
                n.mark,
                format!(
                    "'store' must be a mapping like {{dir: .anneal, link: auto}}, found {}",
                    n.type_name()
                ),
                None,
            );
            return (dir, link);
        };
        for (k, v) in m {
            match k.as_text().unwrap_or_default() {
                "dir" => dir = self.string(v, "store.dir"),
                "link" => match v.as_text() {
                    Some("auto") => link = LinkMode::Auto,
                    Some("copy") => link = LinkMode::Copy,
                    Some("hardlink") => link = LinkMode::Hardlink,
                    Some("reflink") => link = LinkMode::Reflink,
                    other => {
                        let other = other.unwrap_or_default().to_owned();
                        self.err(
                            v.mark,
                            format!("unknown store.link '{other}'"),
                            did_you_mean(&other, &["auto", "copy", "hardlink", "reflink"]),
                        );
                    }
                },
                other => {
                    let other = other.to_owned();
                    self.err(
                        k.mark,
                        format!("unknown key '{other}' in 'store'"),
                        did_you_mean(&other, STORE_KEYS),
                    );
                }
            }
        }
        (dir, link)
    }

    fn vars(&mut self, n: &Node, secret_env: &[String]) -> BTreeMap<String, RVal> {
        let Some(m) = n.as_map() else {
            self.err(
                n.mark,
                format!("'vars' must be a mapping, found {}", n.type_name()),
                None,
            );
            return BTreeMap::new();
        };
        let mut table = VarTable {
            nodes: m
                .iter()
                .map(|(k, v)| (k.as_text().unwrap_or_default().to_owned(), v.clone()))
                .collect(),
            done: BTreeMap::new(),
            active: Vec::new(),
            secret_env,
            errors: Vec::new(),
        };
        let names: Vec<String> = table.nodes.iter().map(|(k, _)| k.clone()).collect();
        for name in names {
            let _ = table.var(&name);
        }
        for (mark, e) in std::mem::take(&mut table.errors) {
            self.err_ref(mark, e);
        }
        table
            .done
            .into_iter()
            .filter_map(|(k, v)| v.map(|v| (k, v)))
            .collect()
    }

    fn stage_doc<'n>(&mut self, k: &'n Node, v: &'n Node) -> Option<StageDoc<'n>> {
        let name = k.as_text().unwrap_or_default().to_owned();
        if name.is_empty()
            || !name
                .chars()
                .all(|c| c.is_alphanumeric() || matches!(c, '_' | '-' | '.'))
        {
            self.err(k.mark, format!("invalid stage name '{name}'"), Some("use letters, digits, '_', '-' and '.' ('@' is reserved for foreach/matrix instances)".into()));
            return None;
        }
        let Some(m) = v.as_map() else {
            self.err(
                v.mark,
                format!(
                    "stage '{name}' must be a mapping with at least 'kind', found {}",
                    v.type_name()
                ),
                None,
            );
            return None;
        };
        let kind_node = m
            .iter()
            .find(|(k, _)| k.as_text() == Some("kind"))
            .map(|(_, v)| v);
        let kinds: Vec<&str> = anneal_stages::builtin_kinds()
            .iter()
            .map(|k| k.kind())
            .collect();
        let kind = match kind_node {
            None => {
                self.err(
                    k.mark,
                    format!("stage '{name}' has no 'kind'"),
                    Some(format!("add `kind:` with one of: {}", kinds.join(", "))),
                );
                None
            }
            Some(kn) => match kn.as_text() {
                Some(t) => match anneal_stages::builtin(t) {
                    Some(kind) => Some(kind),
                    None => {
                        let t = t.to_owned();
                        self.err(
                            kn.mark,
                            format!("unknown stage kind '{t}' in stage '{name}'"),
                            did_you_mean(&t, &kinds),
                        );
                        None
                    }
                },
                None => {
                    self.err(
                        kn.mark,
                        format!("'kind' must be a string, found {}", kn.type_name()),
                        None,
                    );
                    None
                }
            },
        };
        let mut fields = HashMap::new();
        let mut config = Vec::new();
        let kind_keys: Vec<&str> = kind
            .map(|k| k.keys().iter().map(|s| s.name).collect())
            .unwrap_or_default();
        for (key, val) in m {
            let kt = key.as_text().unwrap_or_default();
            if STAGE_KEYS.contains(&kt) {
                fields.insert(kt, val);
            } else if kind_keys.contains(&kt) {
                config.push((kt, val));
            } else if kind.is_some() {
                let all: Vec<&str> = STAGE_KEYS
                    .iter()
                    .copied()
                    .chain(kind_keys.iter().copied())
                    .collect();
                self.err(
                    key.mark,
                    format!("unknown key '{kt}' in stage '{name}'"),
                    did_you_mean(kt, &all),
                );
            }
        }
        let kind = kind?;
        for spec in kind.keys() {
            if spec.required && !config.iter().any(|(k, _)| *k == spec.name) {
                self.err(
                    k.mark,
                    format!(
                        "stage '{name}' of kind '{}' needs '{}'",
                        kind.kind(),
                        spec.name
                    ),
                    Some(format!("add `{}:` ({})", spec.name, spec.doc)),
                );
            }
        }
        if fields.contains_key("foreach") && fields.contains_key("matrix") {
            self.err(
                fields["matrix"].mark,
                format!("stage '{name}' has both 'foreach' and 'matrix'"),
                Some("use one of them".into()),
            );
            return None;
        }
        Some(StageDoc {
            name,
            mark: k.mark,
            kind,
            fields,
            config,
        })
    }

    fn fan_out(
        &mut self,
        doc: &StageDoc,
        vars: &BTreeMap<String, RVal>,
        env: &EnvScope,
    ) -> Vec<Item> {
        let mut base = Scope::new(vars, env, &doc.name);
        if let Some(n) = doc.fields.get("foreach") {
            let v = match resolve(n, &mut base) {
                Ok(v) => v,
                Err(e) => {
                    self.err_ref(n.mark, e);
                    return Vec::new();
                }
            };
            let items: Vec<Item> = match v {
                RVal::List(list) => list
                    .into_iter()
                    .map(|it| Item {
                        suffix: Some(instance_suffix(&it)),
                        item: Some(it),
                        ..Item::default()
                    })
                    .collect(),
                RVal::Map(m) => {
                    // Instances in the order the file lists them.
                    let written: Vec<&str> = n
                        .as_map()
                        .map(|e| e.iter().filter_map(|(k, _)| k.as_text()).collect())
                        .unwrap_or_default();
                    let mut items: Vec<(String, RVal)> = m.into_iter().collect();
                    items.sort_by_key(|(k, _)| {
                        written.iter().position(|w| w == k).unwrap_or(usize::MAX)
                    });
                    items
                        .into_iter()
                        .map(|(k, it)| Item {
                            suffix: Some(k.clone()),
                            key: Some(k),
                            item: Some(it),
                            ..Item::default()
                        })
                        .collect()
                }
                other => {
                    self.err(
                        n.mark,
                        format!(
                            "'foreach' must be a list or a mapping, found {}",
                            other.type_name()
                        ),
                        None,
                    );
                    return Vec::new();
                }
            };
            if items.is_empty() {
                self.err(
                    n.mark,
                    format!("'foreach' of stage '{}' is empty", doc.name),
                    None,
                );
            }
            return items;
        }
        if let Some(n) = doc.fields.get("matrix") {
            let Some(entries) = n.as_map() else {
                self.err(
                    n.mark,
                    format!(
                        "'matrix' must map names to lists of values, found {}",
                        n.type_name()
                    ),
                    None,
                );
                return Vec::new();
            };
            let mut combos: Vec<Vec<(String, RVal)>> = vec![Vec::new()];
            for (k, vn) in entries {
                let key = k.as_text().unwrap_or_default().to_owned();
                let values = match resolve(vn, &mut base) {
                    Ok(RVal::List(l)) if !l.is_empty() => l,
                    Ok(other) => {
                        self.err(
                            vn.mark,
                            format!(
                                "matrix.{key} must be a non-empty list, found {}",
                                other.type_name()
                            ),
                            None,
                        );
                        return Vec::new();
                    }
                    Err(e) => {
                        self.err_ref(vn.mark, e);
                        return Vec::new();
                    }
                };
                combos = combos
                    .into_iter()
                    .flat_map(|c| {
                        let key = key.clone();
                        values.iter().map(move |v| {
                            let mut c = c.clone();
                            c.push((key.clone(), v.clone()));
                            c
                        })
                    })
                    .collect();
            }
            return combos
                .into_iter()
                .map(|c| {
                    let suffix = c
                        .iter()
                        .map(|(k, v)| format!("{k}={}", scalar_text(v)))
                        .collect::<Vec<_>>()
                        .join(",");
                    let m: BTreeMap<String, RVal> = c.into_iter().collect();
                    Item {
                        suffix: Some(suffix),
                        item: Some(RVal::Map(m.clone())),
                        key: None,
                        matrix: Some(m),
                    }
                })
                .collect();
        }
        vec![Item::default()]
    }

    fn outs(
        &mut self,
        doc: &StageDoc,
        item: &Item,
        name: &str,
        vars: &BTreeMap<String, RVal>,
        env: &EnvScope,
    ) -> BTreeMap<String, OutSpec> {
        let mut out = BTreeMap::new();
        let Some(n) = doc.fields.get("outs") else {
            return out;
        };
        let Some(m) = n.as_map() else {
            self.err(
                n.mark,
                format!(
                    "'outs' of stage '{name}' must map output names to paths, found {}",
                    n.type_name()
                ),
                None,
            );
            return out;
        };
        let mut scope = Scope::new(vars, env, name);
        scope.item = Some(item);
        scope.where_ = "outs";
        for (k, v) in m {
            let oname = k.as_text().unwrap_or_default().to_owned();
            let raw = match resolve(v, &mut scope).map(|r| (r.as_plain_str(), r)) {
                Ok((Some(s), _)) => s,
                Ok((None, r)) => {
                    self.err(
                        v.mark,
                        format!(
                            "outs.{oname} of stage '{name}' must be a path, found {}",
                            r.type_name()
                        ),
                        None,
                    );
                    continue;
                }
                Err(e) => {
                    self.err_ref(v.mark, e);
                    continue;
                }
            };
            let dir = raw.ends_with('/');
            match normalize_out(&raw) {
                Ok(path) => {
                    out.insert(
                        oname,
                        OutSpec {
                            path,
                            dir,
                            mark: v.mark,
                        },
                    );
                }
                Err(why) => self.err(
                    v.mark,
                    format!("outs.{oname} of stage '{name}': {why}"),
                    None,
                ),
            }
        }
        out
    }

    fn check_out_overlap(
        &mut self,
        instances: &[(usize, Item, String)],
        outs: &[BTreeMap<String, OutSpec>],
    ) {
        let mut seen: Vec<(&str, &str, &str)> = Vec::new();
        for (i, o) in outs.iter().enumerate() {
            for (oname, spec) in o {
                for (stage, other_name, other) in &seen {
                    let a = spec.path.as_str();
                    let nested = a == *other
                        || a.strip_prefix(other).is_some_and(|r| r.starts_with('/'))
                        || other.strip_prefix(a).is_some_and(|r| r.starts_with('/'));
                    if nested {
                        let msg = if a == *other {
                            format!(
                                "output path '{a}' is declared twice: by '{}' (outs.{oname}) and by '{stage}' (outs.{other_name})",
                                instances[i].2
                            )
                        } else {
                            format!(
                                "output '{a}' of '{}' overlaps output '{other}' of '{stage}'",
                                instances[i].2
                            )
                        };
                        self.rep.error(spec.mark, msg, Some("every output needs a path of its own; with foreach/matrix put ${item} in the path".into()));
                    }
                }
                seen.push((instances[i].2.as_str(), oname.as_str(), spec.path.as_str()));
            }
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn stage(
        &mut self,
        doc: &StageDoc,
        idx: usize,
        item: &Item,
        name: &str,
        vars: &BTreeMap<String, RVal>,
        env: &EnvScope,
        index: &StageIndex,
        outs: BTreeMap<String, OutSpec>,
    ) -> Option<StageSpec> {
        let mut scope = Scope::new(vars, env, name);
        scope.item = Some(item);
        scope.stages = Some((index, idx, item.suffix.as_deref()));
        // deps
        let mut deps = BTreeMap::new();
        if let Some(n) = doc.fields.get("deps") {
            match n.as_map() {
                None => self.err(
                    n.mark,
                    format!(
                        "'deps' of stage '{name}' must map input names to paths, found {}",
                        n.type_name()
                    ),
                    None,
                ),
                Some(m) => {
                    scope.where_ = "deps";
                    for (k, v) in m {
                        let dname = k.as_text().unwrap_or_default().to_owned();
                        let before = scope.refs.len();
                        let r = match resolve(v, &mut scope) {
                            Ok(r) => r,
                            Err(e) => {
                                self.err_ref(v.mark, e);
                                // Keep the name so `${deps.NAME}` does not report it again.
                                let mark = v.mark;
                                deps.insert(
                                    dname,
                                    DepSpec {
                                        path: String::new(),
                                        from: None,
                                        mark,
                                    },
                                );
                                continue;
                            }
                        };
                        let Some(path) = r.as_plain_str() else {
                            self.err(
                                v.mark,
                                format!(
                                    "deps.{dname} of stage '{name}' must be a path, found {}",
                                    r.type_name()
                                ),
                                None,
                            );
                            continue;
                        };
                        let path = normalize_dep(&path);
                        let from = if scope.refs.len() == before + 1
                            && index.outs[scope.refs[before].0]
                                .get(&scope.refs[before].1)
                                .is_some_and(|o| o.path == path)
                        {
                            scope.refs.pop()
                        } else {
                            // A literal path that another stage declares as output is that output.
                            index.find_out(&path)
                        };
                        deps.insert(
                            dname,
                            DepSpec {
                                path,
                                from,
                                mark: v.mark,
                            },
                        );
                    }
                }
            }
        }
        scope.where_ = "params";
        let params = match doc.fields.get("params") {
            None => RVal::Map(BTreeMap::new()),
            Some(n) if n.as_map().is_none() => {
                self.err(
                    n.mark,
                    format!(
                        "'params' of stage '{name}' must be a mapping, found {}",
                        n.type_name()
                    ),
                    None,
                );
                RVal::Map(BTreeMap::new())
            }
            Some(n) => self.resolve_map_entries(n, &mut scope),
        };
        let (cpus, gpus) = doc
            .fields
            .get("resources")
            .map(|n| self.resources(n, &mut scope, name))
            .unwrap_or((1, 0));
        scope.where_ = "stage";
        scope.deps = Some(&deps);
        scope.outs = Some(&outs);
        scope.params = Some(&params);
        let mut config = BTreeMap::new();
        let mut config_ok = true;
        for (k, v) in &doc.config {
            match resolve(v, &mut scope) {
                Ok(r) => {
                    config.insert((*k).to_owned(), r);
                }
                Err(e) => {
                    config_ok = false;
                    self.err_ref(v.mark, e);
                }
            }
        }
        let desc = doc
            .fields
            .get("desc")
            .and_then(|n| n.as_text().map(str::to_owned));
        self.check_io(doc, name, &deps, &outs);
        // `${stages...}` outside deps: implicit inputs, so their content is in the key.
        let refs = std::mem::take(&mut scope.refs);
        for (up, oname) in refs {
            if deps
                .values()
                .any(|d| d.from.as_ref() == Some(&(up, oname.clone())))
            {
                continue;
            }
            let path = index.outs[up][&oname].path.clone();
            let key = format!("stages.{}.outs.{oname}", index.names[up].1);
            deps.insert(
                key,
                DepSpec {
                    path,
                    from: Some((up, oname)),
                    mark: doc.mark,
                },
            );
        }
        for (dname, d) in &deps {
            if let Some((up, _)) = &d.from
                && *up == idx
            {
                self.err(
                    d.mark,
                    format!("deps.{dname} of stage '{name}' is its own output"),
                    Some(
                        "a stage cannot read what it writes; use ${outs.NAME} for the output path"
                            .into(),
                    ),
                );
            }
        }
        let mut secrets = Vec::new();
        params.secrets(&mut secrets);
        config.values().for_each(|v| v.secrets(&mut secrets));
        // Let the kind check its own keys now; values with secrets or outputs are placeholders.
        let shown = |n: &str| format!("${{outs.{n}}}");
        let cfg_json: BTreeMap<String, serde_json::Value> = config
            .iter()
            .map(|(k, v)| (k.clone(), v.render(crate::interp::Mode::Key, &shown)))
            .collect();
        let problems = if config_ok {
            doc.kind
                .check(&cfg_json, &params.render(crate::interp::Mode::Key, &shown))
        } else {
            Vec::new()
        };
        for e in problems {
            let mark = locate(doc, &e.key).unwrap_or(doc.mark);
            self.err(
                mark,
                format!("stage '{name}': {}: {}", e.key, e.message),
                None,
            );
        }
        Some(StageSpec {
            name: name.to_owned(),
            base: doc.name.clone(),
            mark: doc.mark,
            kind: doc.kind,
            desc,
            deps,
            outs,
            params,
            config,
            cpus,
            gpus,
            secrets,
        })
    }

    /// Inputs and outputs against what the kind declares it reads and writes.
    fn check_io(
        &mut self,
        doc: &StageDoc,
        name: &str,
        deps: &BTreeMap<String, DepSpec>,
        outs: &BTreeMap<String, OutSpec>,
    ) {
        let kind = doc.kind.kind();
        let sides = [
            (
                "deps",
                "input",
                doc.kind.inputs(),
                deps.iter().map(|(k, d)| (k, d.mark)).collect::<Vec<_>>(),
            ),
            (
                "outs",
                "output",
                doc.kind.outputs(),
                outs.iter().map(|(k, o)| (k, o.mark)).collect(),
            ),
        ];
        for (key, what, specs, declared) in sides {
            if specs.is_empty() {
                continue;
            }
            let names: Vec<&str> = specs.iter().map(|s| s.name).collect();
            for (n, mark) in &declared {
                if !names.contains(&n.as_str()) {
                    self.err(
                        *mark,
                        format!("kind '{kind}' has no {what} '{n}' (stage '{name}')"),
                        did_you_mean(n, &names),
                    );
                }
            }
            for spec in specs.iter().filter(|s| s.required) {
                if !declared.iter().any(|(n, _)| n.as_str() == spec.name) {
                    let mark = doc.fields.get(key).map(|n| n.mark).unwrap_or(doc.mark);
                    self.err(
                        mark,
                        format!(
                            "stage '{name}' of kind '{kind}' needs {what} '{}' under {key}:",
                            spec.name
                        ),
                        Some(format!("add `{}: PATH` ({})", spec.name, spec.doc)),
                    );
                }
            }
        }
    }

    fn resolve_map_entries(&mut self, n: &Node, scope: &mut Scope) -> RVal {
        let mut m = BTreeMap::new();
        for (k, v) in n.as_map().unwrap_or_default() {
            match resolve(v, scope) {
                Ok(r) => {
                    m.insert(k.as_text().unwrap_or_default().to_owned(), r);
                }
                Err(e) => self.err_ref(v.mark, e),
            }
        }
        RVal::Map(m)
    }

    fn resources(&mut self, n: &Node, scope: &mut Scope, name: &str) -> (u32, u32) {
        let (mut cpus, mut gpus) = (1, 0);
        let Some(m) = n.as_map() else {
            self.err(n.mark, format!("'resources' of stage '{name}' must be a mapping like {{cpus: 2, gpus: 1}}, found {}", n.type_name()), None);
            return (cpus, gpus);
        };
        scope.where_ = "resources";
        for (k, v) in m {
            let key = k.as_text().unwrap_or_default().to_owned();
            if !RESOURCE_KEYS.contains(&key.as_str()) {
                self.err(
                    k.mark,
                    format!("unknown key '{key}' in resources of stage '{name}'"),
                    did_you_mean(&key, RESOURCE_KEYS),
                );
                continue;
            }
            let val = match resolve(v, scope) {
                Ok(RVal::Num(x)) if x.as_u64().is_some_and(|x| x <= u32::MAX as u64) => {
                    x.as_u64().unwrap_or(0) as u32
                }
                Ok(other) => {
                    let found = match &other {
                        RVal::Num(x) => crate::interp::fmt_num(x),
                        o => o.type_name().to_owned(),
                    };
                    self.err(
                        v.mark,
                        format!(
                            "resources.{key} of stage '{name}' must be a whole number of 0 or more, found {found}"
                        ),
                        None,
                    );
                    continue;
                }
                Err(e) => {
                    self.err_ref(v.mark, e);
                    continue;
                }
            };
            if key == "cpus" {
                if val == 0 {
                    self.err(v.mark, "resources.cpus must be at least 1", None);
                }
                cpus = val.max(1);
            } else {
                gpus = val;
            }
        }
        (cpus, gpus)
    }
}

/// Finds the node of `key` (`cmd`, `params.lr`) inside a stage as written.
fn locate(doc: &StageDoc, key: &str) -> Option<Mark> {
    let mut parts = key.split('.');
    let first = parts.next()?;
    let mut node: &Node = doc
        .config
        .iter()
        .find(|(k, _)| *k == first)
        .map(|(_, v)| *v)
        .or_else(|| doc.fields.get(first).copied())?;
    for p in parts {
        match node
            .as_map()
            .and_then(|m| m.iter().find(|(k, _)| k.as_text() == Some(p)))
        {
            Some((_, v)) => node = v,
            None => break,
        }
    }
    Some(node.mark)
}

fn scalar_text(v: &RVal) -> String {
    v.as_plain_str().unwrap_or_else(|| match v {
        RVal::Num(n) => crate::interp::fmt_num(n),
        RVal::Bool(b) => b.to_string(),
        RVal::Null => "null".into(),
        _ => "?".into(),
    })
}

/// `name@...` suffix for a foreach item: the value, or `k=v,...` for a mapping of scalars.
fn instance_suffix(item: &RVal) -> String {
    match item {
        RVal::Map(m) => m
            .iter()
            .map(|(k, v)| format!("{k}={}", scalar_text(v)))
            .collect::<Vec<_>>()
            .join(","),
        other => scalar_text(other),
    }
}

/// `p` made absolute with every symlink on it resolved, dangling ones too
/// (whose targets may be created later, as the store is), and `..` applied
/// after resolution, as the kernel does.
fn resolve_existing(p: &Path) -> PathBuf {
    // Components still to walk, last first.
    let mut todo: Vec<std::ffi::OsString> = Vec::new();
    let push = |todo: &mut Vec<std::ffi::OsString>, path: &Path| {
        for c in path.components().rev() {
            match c {
                Component::Normal(s) => todo.push(s.to_owned()),
                Component::ParentDir => todo.push("..".into()),
                _ => {}
            }
        }
    };
    push(
        &mut todo,
        &std::path::absolute(p).unwrap_or_else(|_| p.to_path_buf()),
    );
    let mut out = PathBuf::from("/");
    let mut hops = 0;
    while let Some(c) = todo.pop() {
        if c == ".." {
            out.pop();
            continue;
        }
        let next = out.join(&c);
        match std::fs::read_link(&next) {
            Ok(target) if hops < 40 => {
                hops += 1;
                if target.is_absolute() {
                    out = PathBuf::from("/");
                }
                push(&mut todo, &target);
            }
            _ => out = next,
        }
    }
    out
}

fn normalize_dep(p: &str) -> String {
    let mut s = p.trim_end_matches('/').to_owned();
    while let Some(rest) = s.strip_prefix("./") {
        s = rest.to_owned();
    }
    if s.is_empty() { ".".into() } else { s }
}

fn normalize_out(p: &str) -> Result<String, String> {
    if p.trim().is_empty() {
        return Err("the path is empty".into());
    }
    let path = Path::new(p);
    if path.is_absolute() {
        return Err(format!(
            "'{p}' is absolute; outputs must be relative to the pipeline directory"
        ));
    }
    let mut parts = Vec::new();
    for c in path.components() {
        match c {
            Component::Normal(s) => parts.push(s.to_string_lossy().into_owned()),
            Component::CurDir => {}
            _ => {
                return Err(format!(
                    "'{p}' leaves the pipeline directory; outputs must stay inside it"
                ));
            }
        }
    }
    if parts.is_empty() {
        return Err(format!("'{p}' is the pipeline directory itself"));
    }
    Ok(parts.join("/"))
}

struct EnvScope<'a> {
    secret_env: &'a [String],
}

impl EnvScope<'_> {
    fn lookup(&self, rest: &str) -> Result<RVal, (String, Option<String>)> {
        let (name, default) = match rest.split_once(":-") {
            Some((n, d)) => (n.trim(), Some(d)),
            None => (rest.trim(), None),
        };
        if name.is_empty() || !name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
            return Err((format!("invalid environment variable name '{name}'"), None));
        }
        let secret = is_secret_name(name, self.secret_env);
        match std::env::var(name) {
            Ok(_) if secret => Ok(RVal::Str(vec![Seg::Secret(name.to_owned())])),
            Ok(v) => Ok(RVal::str(v)),
            Err(_) => match default {
                Some(d) => Ok(RVal::str(d)),
                // A secret is needed only when the stage runs; the executor checks it then.
                None if secret => Ok(RVal::Str(vec![Seg::Secret(name.to_owned())])),
                None => Err((
                    format!("environment variable '{name}' is not set"),
                    Some(format!(
                        "set {name}, or give a default: ${{env.{name}:-value}}"
                    )),
                )),
            },
        }
    }
}

struct VarTable<'a> {
    nodes: Vec<(String, Node)>,
    done: BTreeMap<String, Option<RVal>>,
    active: Vec<String>,
    secret_env: &'a [String],
    errors: Vec<(Mark, RefError)>,
}

impl VarTable<'_> {
    /// Resolves `vars.<name>`; `None` when it failed (already reported).
    fn var(&mut self, name: &str) -> Result<Option<RVal>, (String, Option<String>)> {
        if let Some(v) = self.done.get(name) {
            return Ok(v.clone());
        }
        if let Some(pos) = self.active.iter().position(|a| a == name) {
            let mut cyc: Vec<String> = self.active[pos..]
                .iter()
                .map(|v| format!("vars.{v}"))
                .collect();
            cyc.push(format!("vars.{name}"));
            return Err((format!("cycle: {}", cyc.join(" -> ")), None));
        }
        let Some((_, node)) = self.nodes.iter().find(|(k, _)| k == name).cloned() else {
            let names: Vec<&str> = self.nodes.iter().map(|(k, _)| k.as_str()).collect();
            return Err((
                format!("unknown variable 'vars.{name}'"),
                did_you_mean(name, &names),
            ));
        };
        self.active.push(name.to_owned());
        let r = resolve(&node, &mut VarScope { table: self });
        self.active.pop();
        let v = match r {
            Ok(v) => Some(v),
            Err(e) => {
                if !self.errors.iter().any(|(_, x)| x.msg == e.msg) {
                    self.errors.push((node.mark, e));
                }
                None
            }
        };
        self.done.insert(name.to_owned(), v.clone());
        Ok(v)
    }
}

struct VarScope<'t, 'a> {
    table: &'t mut VarTable<'a>,
}

impl Lookup for VarScope<'_, '_> {
    fn lookup(&mut self, expr: &str) -> Result<RVal, (String, Option<String>)> {
        let (ns, rest) = expr.split_once('.').unwrap_or((expr, ""));
        match ns {
            "env" => EnvScope {
                secret_env: self.table.secret_env,
            }
            .lookup(rest),
            "vars" => {
                let mut path = rest.split('.');
                let head = path.next().unwrap_or_default();
                let v = self
                    .table
                    .var(head)?
                    .ok_or_else(|| (format!("vars.{head} has an error (see above)"), None))?;
                let rest: Vec<&str> = path.collect();
                v.get(&rest)
                    .cloned()
                    .map_err(|e| (format!("in '${{{expr}}}': {e}"), None))
            }
            _ => Err((
                format!("'${{{expr}}}' cannot be used in vars"),
                Some("vars may refer to ${vars.x} and ${env.X}".into()),
            )),
        }
    }
}

/// Every stage instance's name and outputs, for `${stages.S.outs.O}`.
struct StageIndex<'a> {
    /// (base name, instance name) per stage.
    names: &'a [(String, String)],
    outs: &'a [BTreeMap<String, OutSpec>],
    /// Declared stages that failed to load.
    broken: &'a [String],
}

impl StageIndex<'_> {
    fn find_out(&self, path: &str) -> Option<(usize, String)> {
        self.outs.iter().enumerate().find_map(|(i, o)| {
            o.iter()
                .find(|(_, spec)| spec.path == path)
                .map(|(n, _)| (i, n.clone()))
        })
    }
}

/// What `${...}` can see at one place in a stage.
struct Scope<'a> {
    vars: &'a BTreeMap<String, RVal>,
    env: &'a EnvScope<'a>,
    stage_name: &'a str,
    item: Option<&'a Item>,
    stages: Option<(&'a StageIndex<'a>, usize, Option<&'a str>)>,
    deps: Option<&'a BTreeMap<String, DepSpec>>,
    outs: Option<&'a BTreeMap<String, OutSpec>>,
    params: Option<&'a RVal>,
    where_: &'static str,
    refs: Vec<(usize, String)>,
}

impl<'a> Scope<'a> {
    fn new(vars: &'a BTreeMap<String, RVal>, env: &'a EnvScope<'a>, stage_name: &'a str) -> Self {
        Scope {
            vars,
            env,
            stage_name,
            item: None,
            stages: None,
            deps: None,
            outs: None,
            params: None,
            where_: "foreach",
            refs: Vec::new(),
        }
    }

    fn not_here(&self, expr: &str) -> (String, Option<String>) {
        let allowed = match self.where_ {
            "stage" => {
                "${vars.x}, ${env.X}, ${item}, ${stages.S.outs.O}, ${deps.x}, ${outs.x}, ${params.x}"
            }
            "deps" | "params" => "${vars.x}, ${env.X}, ${item} and ${stages.S.outs.O}",
            _ => "${vars.x}, ${env.X} and ${item}",
        };
        (
            format!(
                "'${{{expr}}}' cannot be used in {} of stage '{}'",
                self.where_, self.stage_name
            ),
            Some(format!("here you can use {allowed}")),
        )
    }

    fn stage_ref(&mut self, expr: &str, rest: &str) -> Result<RVal, (String, Option<String>)> {
        let Some((index, me, my_suffix)) = self.stages else {
            return Err(self.not_here(expr));
        };
        let Some((sname, oname)) = rest.rsplit_once(".outs.") else {
            return Err((
                format!("malformed reference '${{{expr}}}'"),
                Some("write ${stages.STAGE.outs.OUTPUT}".into()),
            ));
        };
        let exact = index.names.iter().position(|(_, n)| n == sname);
        let found = exact.or_else(|| {
            // `${stages.train.outs.model}` from `eval@x` means `train@x` when both fan out alike.
            let suffix = my_suffix?;
            let want = format!("{sname}@{suffix}");
            index.names.iter().position(|(_, n)| *n == want)
        });
        let Some(up) = found else {
            if index.broken.iter().any(|b| b == sname) {
                return Err((String::new(), None));
            }
            let instances: Vec<&str> = index
                .names
                .iter()
                .filter(|(b, _)| b == sname)
                .map(|(_, n)| n.as_str())
                .collect();
            if !instances.is_empty() {
                return Err((
                    format!(
                        "'${{{expr}}}': stage '{sname}' fans out into {} instances",
                        instances.len()
                    ),
                    Some(format!("name one of: {}", instances.join(", "))),
                ));
            }
            let names: Vec<&str> = index.names.iter().map(|(_, n)| n.as_str()).collect();
            return Err((
                format!("'${{{expr}}}' refers to unknown stage '{sname}'"),
                did_you_mean(sname, &names),
            ));
        };
        if up == me {
            return Err((
                format!("'${{{expr}}}' refers to stage '{}' itself", self.stage_name),
                Some(format!("use ${{outs.{oname}}} for its own outputs")),
            ));
        }
        let Some(o) = index.outs[up].get(oname) else {
            let outs: Vec<&str> = index.outs[up].keys().map(String::as_str).collect();
            return Err((
                format!(
                    "'${{{expr}}}': stage '{}' has no output '{oname}'",
                    index.names[up].1
                ),
                did_you_mean(oname, &outs),
            ));
        };
        self.refs.push((up, oname.to_owned()));
        Ok(RVal::str(o.path.clone()))
    }
}

impl Lookup for Scope<'_> {
    fn lookup(&mut self, expr: &str) -> Result<RVal, (String, Option<String>)> {
        let (ns, rest) = expr.split_once('.').unwrap_or((expr, ""));
        let path: Vec<&str> = if rest.is_empty() {
            Vec::new()
        } else {
            rest.split('.').collect()
        };
        let sub = |v: &RVal, path: &[&str]| {
            v.get(path)
                .cloned()
                .map_err(|e| (format!("in '${{{expr}}}': {e}"), None))
        };
        match ns {
            "env" => self.env.lookup(rest),
            "vars" => {
                let Some((head, tail)) = path.split_first() else {
                    return Err(("'${vars}' needs a name: ${vars.NAME}".into(), None));
                };
                match self.vars.get(*head) {
                    Some(v) => sub(v, tail),
                    None => {
                        let names: Vec<&str> = self.vars.keys().map(String::as_str).collect();
                        Err((
                            format!("unknown variable 'vars.{head}'"),
                            did_you_mean(head, &names),
                        ))
                    }
                }
            }
            "item" | "key" | "matrix" => {
                let it = self.item.filter(|i| i.suffix.is_some()).ok_or_else(|| {
                    (
                        format!("'${{{expr}}}' is only defined in a stage with foreach or matrix"),
                        None,
                    )
                })?;
                match ns {
                    "item" => sub(it.item.as_ref().unwrap_or(&RVal::Null), &path),
                    "key" => it.key.clone().map(RVal::str).ok_or_else(|| {
                        (
                            "'${key}' is only defined when foreach is a mapping".into(),
                            None,
                        )
                    }),
                    _ => match &it.matrix {
                        Some(m) => sub(&RVal::Map(m.clone()), &path),
                        None => Err((
                            "'${matrix.x}' is only defined in a stage with matrix; use ${item}"
                                .into(),
                            None,
                        )),
                    },
                }
            }
            "stages" => self.stage_ref(expr, rest),
            "deps" => {
                let Some(deps) = self.deps else {
                    return Err(self.not_here(expr));
                };
                match deps.get(rest) {
                    Some(d) => Ok(RVal::str(d.path.clone())),
                    None => {
                        let names: Vec<&str> = deps.keys().map(String::as_str).collect();
                        Err((
                            format!(
                                "'${{{expr}}}': stage '{}' has no input '{rest}'",
                                self.stage_name
                            ),
                            did_you_mean(rest, &names).or(Some("declare it under deps:".into())),
                        ))
                    }
                }
            }
            "outs" => {
                let Some(outs) = self.outs else {
                    return Err(self.not_here(expr));
                };
                if outs.contains_key(rest) {
                    Ok(RVal::Str(vec![Seg::Out(rest.to_owned())]))
                } else {
                    let names: Vec<&str> = outs.keys().map(String::as_str).collect();
                    Err((
                        format!(
                            "'${{{expr}}}': stage '{}' has no output '{rest}'",
                            self.stage_name
                        ),
                        did_you_mean(rest, &names).or(Some("declare it under outs:".into())),
                    ))
                }
            }
            "params" => {
                let Some(params) = self.params else {
                    return Err(self.not_here(expr));
                };
                params.get(&path).cloned().map_err(|e| {
                    let keys: Vec<&str> = match params {
                        RVal::Map(m) => m.keys().map(String::as_str).collect(),
                        _ => Vec::new(),
                    };
                    (
                        format!("'${{{expr}}}' of stage '{}': {e}", self.stage_name),
                        path.first().and_then(|h| did_you_mean(h, &keys)),
                    )
                })
            }
            other => Err((
                format!("unknown reference '${{{expr}}}'"),
                did_you_mean(
                    other,
                    &[
                        "vars", "env", "stages", "deps", "outs", "params", "item", "key", "matrix",
                    ],
                )
                .map(|h| {
                    format!(
                        "{h} (references look like ${{vars.x}}, ${{env.X}}, ${{stages.S.outs.O}})"
                    )
                }),
            )),
        }
    }
}
