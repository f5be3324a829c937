//! Model resolution: `--model` is a local directory or a Hugging Face Hub id. Hub ids resolve
//! through the standard cache (`HF_HUB_CACHE`, `HF_HOME/hub`, `~/.cache/huggingface/hub`; its
//! `models--org--name/refs/<revision>` and `snapshots/<commit>/` layout), so files Python already
//! downloaded are reused. Missing files are downloaded (hf-hub, with progress bars) unless offline;
//! offline, the error lists exactly the missing files and how to get them.

use std::path::{Path, PathBuf};

use crate::error::{GenerateError, Result};

/// The model `xgen` runs when none is named.
pub const DEFAULT_MODEL: &str = "Salesforce/xgen-7b-8k-base";

/// Whether the Hub may be contacted.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Network {
    Online,
    /// `HF_HUB_OFFLINE=1`: the cache only.
    Offline,
}

impl Network {
    /// Offline when `HF_HUB_OFFLINE` or `TRANSFORMERS_OFFLINE` is set to a true value.
    pub fn from_env() -> Self {
        let on = |k: &str| {
            std::env::var(k)
                .is_ok_and(|v| matches!(v.to_ascii_lowercase().as_str(), "1" | "true" | "yes" | "on"))
        };
        if on("HF_HUB_OFFLINE") || on("TRANSFORMERS_OFFLINE") {
            Self::Offline
        } else {
            Self::Online
        }
    }
}

/// The root of the Hub cache.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HubCache {
    pub root: PathBuf,
}

impl HubCache {
    pub fn new(root: impl Into<PathBuf>) -> Self {
        Self { root: root.into() }
    }

    /// Where huggingface_hub looks: `HF_HUB_CACHE`, else `HF_HOME/hub`, else
    /// `$XDG_CACHE_HOME/huggingface/hub`, else `~/.cache/huggingface/hub`.
    pub fn from_env() -> Self {
        Self::from_lookup(|k| std::env::var_os(k))
    }

    /// [`HubCache::from_env`] over any variable lookup.
    pub fn from_lookup(lookup: impl Fn(&str) -> Option<std::ffi::OsString>) -> Self {
        let var = |k: &str| lookup(k).filter(|v| !v.is_empty()).map(PathBuf::from);
        let root = var("HF_HUB_CACHE")
            .or_else(|| var("HF_HOME").map(|h| h.join("hub")))
            .or_else(|| var("XDG_CACHE_HOME").map(|c| c.join("huggingface/hub")))
            .unwrap_or_else(|| var("HOME").unwrap_or_default().join(".cache/huggingface/hub"));
        Self::new(root)
    }

    /// `models--org--name`.
    pub fn repo_dir(&self, repo: &str) -> PathBuf {
        self.root.join(format!("models--{}", repo.replace('/', "--")))
    }

    /// The snapshot folder of `revision` (a branch or tag under `refs/`, or a commit hash).
    pub fn snapshot(&self, repo: &str, revision: &str) -> Option<PathBuf> {
        let dir = self.repo_dir(repo);
        let commit = match std::fs::read_to_string(dir.join("refs").join(revision)) {
            Ok(hash) => hash.trim().to_string(),
            Err(_) => revision.to_string(),
        };
        let snapshot = dir.join("snapshots").join(commit);
        snapshot.is_dir().then_some(snapshot)
    }
}

/// Resolves `spec` to a local model directory.
pub fn resolve(spec: &str, revision: &str, cache: &HubCache, network: Network) -> Result<PathBuf> {
    let path = Path::new(spec);
    if path.is_dir() {
        return Ok(path.to_path_buf());
    }
    if !is_repo_id(spec) {
        return Err(GenerateError::NotFound(format!(
            "--model {spec}: no such directory, and not a Hub id of the form org/name"
        )));
    }
    let snapshot = cache.snapshot(spec, revision);
    let missing = match &snapshot {
        Some(dir) => missing_files(dir, spec),
        None => expected_files(spec),
    };
    if let (Some(dir), true) = (&snapshot, missing.is_empty()) {
        return Ok(dir.clone());
    }
    match network {
        Network::Offline => Err(missing_error(spec, revision, cache, &missing, "HF_HUB_OFFLINE is set")),
        Network::Online => download(spec, revision, cache)
            .map_err(|why| missing_error(spec, revision, cache, &missing, &why)),
    }
}

fn is_repo_id(spec: &str) -> bool {
    let mut parts = spec.split('/');
    let ok = |s: Option<&str>| {
        s.is_some_and(|s| !s.is_empty() && s.chars().all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c)))
    };
    ok(parts.next()) && ok(parts.next()) && parts.next().is_none()
}

/// Files a model needs, by name, when nothing of it is cached. The official XGen repositories'
/// layout is known; for others, the candidates are named.
fn expected_files(repo: &str) -> Vec<String> {
    let mut files = vec!["config.json".to_string()];
    if repo.starts_with("Salesforce/xgen-7b-") {
        files.push("generation_config.json".into());
        files.push("pytorch_model.bin.index.json".into());
        files.extend((1..=3).map(|i| format!("pytorch_model-0000{i}-of-00003.bin")));
    } else {
        files.push("model.safetensors.index.json or model.safetensors or pytorch_model.bin.index.json or pytorch_model.bin (with the shards its index lists)".into());
    }
    files
}

/// Files missing from a snapshot: config, the weight index or single file, and indexed shards.
fn missing_files(dir: &Path, repo: &str) -> Vec<String> {
    let mut missing = Vec::new();
    if !dir.join("config.json").is_file() {
        missing.push("config.json".to_string());
    }
    let indexes = ["model.safetensors.index.json", "pytorch_model.bin.index.json"];
    let singles = ["model.safetensors", "pytorch_model.bin"];
    if let Some(index) = indexes.iter().map(|i| dir.join(i)).find(|p| p.is_file()) {
        match shard_names(&index) {
            Some(shards) => missing.extend(shards.into_iter().filter(|s| !dir.join(s).is_file())),
            None => missing.push(format!("{} (unreadable; delete it to download again)", index.display())),
        }
    } else if !singles.iter().any(|s| dir.join(s).is_file()) {
        missing.extend(expected_files(repo).into_iter().skip(1).filter(|f| !dir.join(f).is_file()));
    }
    missing
}

/// The shard files an index's `weight_map` names, sorted and unique.
fn shard_names(index: &Path) -> Option<Vec<String>> {
    let value: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(index).ok()?).ok()?;
    let mut shards: Vec<String> =
        value.get("weight_map")?.as_object()?.values().filter_map(|v| v.as_str().map(String::from)).collect();
    shards.sort();
    shards.dedup();
    Some(shards)
}

fn missing_error(
    repo: &str,
    revision: &str,
    cache: &HubCache,
    missing: &[String],
    why: &str,
) -> GenerateError {
    let list: String = missing.iter().map(|f| format!("\n  {f}")).collect();
    GenerateError::NotFound(format!(
        "model {repo} (revision {revision}) is not complete in the Hugging Face cache {} and cannot be downloaded ({why}).\n\
         Missing files:{list}\n\
         Get them with `huggingface-cli download {repo}` (or `hf download {repo}`) where the Hub is reachable, \
         copy that cache here (set HF_HOME or HF_HUB_CACHE to use another location), or pass --model DIR \
         with a local model directory.",
        cache.repo_dir(repo).display()
    ))
}

/// Downloads config, generation config, the tokenizer files (`tokenizer.json`,
/// `tokenizer_config.json`, `chat_template.jinja`, where the repo has them) and weights of `repo`
/// into the cache; returns the snapshot.
fn download(repo: &str, revision: &str, cache: &HubCache) -> std::result::Result<PathBuf, String> {
    use hf_hub::{api::sync::ApiBuilder, Cache, Repo, RepoType};
    let api = ApiBuilder::from_cache(Cache::new(cache.root.clone()))
        .with_progress(true)
        .build()
        .map_err(|e| e.to_string())?;
    let api = api.repo(Repo::with_revision(repo.to_string(), RepoType::Model, revision.to_string()));
    let info = api.info().map_err(|e| e.to_string())?;
    let listed: Vec<&str> = info.siblings.iter().map(|s| s.rfilename.as_str()).collect();
    let config = api.get("config.json").map_err(|e| e.to_string())?;
    for optional in
        ["generation_config.json", "tokenizer.json", "tokenizer_config.json", "chat_template.jinja"]
    {
        if listed.contains(&optional) {
            api.get(optional).map_err(|e| e.to_string())?;
        }
    }
    let weights = [
        "model.safetensors.index.json",
        "model.safetensors",
        "pytorch_model.bin.index.json",
        "pytorch_model.bin",
    ]
    .into_iter()
    .find(|f| listed.contains(f))
    .ok_or_else(|| format!("{repo} has no weights in a supported format"))?;
    let path = api.get(weights).map_err(|e| e.to_string())?;
    if weights.ends_with(".index.json") {
        for shard in shard_names(&path).ok_or_else(|| format!("{weights}: unreadable index"))? {
            api.get(&shard).map_err(|e| e.to_string())?;
        }
    }
    config.parent().map(Path::to_path_buf).ok_or_else(|| "config.json has no folder".to_string())
}
