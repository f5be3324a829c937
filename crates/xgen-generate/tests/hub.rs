//! Model resolution against a mock Hugging Face cache in a temporary directory (never the network).

use std::{fs, path::Path};

use xgen_generate::hub::{resolve, HubCache, Network};

const COMMIT: &str = "0123456789abcdef0123456789abcdef01234567";

/// `models--Salesforce--xgen-7b-8k-base` with `refs/main` and a snapshot holding `files`.
fn mock_cache(files: &[&str]) -> (tempfile::TempDir, HubCache) {
    let root = tempfile::tempdir().unwrap();
    let cache = HubCache::new(root.path());
    let repo = cache.repo_dir("Salesforce/xgen-7b-8k-base");
    fs::create_dir_all(repo.join("refs")).unwrap();
    fs::write(repo.join("refs/main"), COMMIT).unwrap();
    let snapshot = repo.join("snapshots").join(COMMIT);
    fs::create_dir_all(&snapshot).unwrap();
    fs::create_dir_all(repo.join("blobs")).unwrap();
    for f in files {
        // Snapshots hold symlinks into blobs/, as huggingface_hub writes them.
        let blob = repo.join("blobs").join(format!("blob-{f}"));
        let content = if *f == "pytorch_model.bin.index.json" {
            r#"{"weight_map": {"a": "pytorch_model-00001-of-00003.bin", "b": "pytorch_model-00002-of-00003.bin", "c": "pytorch_model-00003-of-00003.bin"}}"#
        } else {
            "{}"
        };
        fs::write(&blob, content).unwrap();
        std::os::unix::fs::symlink(&blob, snapshot.join(f)).unwrap();
    }
    (root, cache)
}

const ALL: [&str; 6] = [
    "config.json",
    "generation_config.json",
    "pytorch_model.bin.index.json",
    "pytorch_model-00001-of-00003.bin",
    "pytorch_model-00002-of-00003.bin",
    "pytorch_model-00003-of-00003.bin",
];

#[test]
fn complete_snapshot_resolves_offline_and_online() {
    let (_root, cache) = mock_cache(&ALL);
    let want = cache.repo_dir("Salesforce/xgen-7b-8k-base").join("snapshots").join(COMMIT);
    for network in [Network::Offline, Network::Online] {
        assert_eq!(resolve("Salesforce/xgen-7b-8k-base", "main", &cache, network).unwrap(), want);
    }
    // A commit hash works as the revision too.
    assert_eq!(resolve("Salesforce/xgen-7b-8k-base", COMMIT, &cache, Network::Offline).unwrap(), want);
}

#[test]
fn offline_lists_exactly_the_missing_files() {
    let (_root, cache) = mock_cache(&ALL[..4]);
    let err =
        resolve("Salesforce/xgen-7b-8k-base", "main", &cache, Network::Offline).unwrap_err().to_string();
    assert!(
        err.contains("pytorch_model-00002-of-00003.bin") && err.contains("pytorch_model-00003-of-00003.bin"),
        "{err}"
    );
    assert!(!err.contains("pytorch_model-00001-of-00003.bin") && !err.contains("  config.json"), "{err}");
    assert!(
        err.contains("HF_HUB_OFFLINE") && err.contains("huggingface-cli download Salesforce/xgen-7b-8k-base"),
        "{err}"
    );
}

#[test]
fn nothing_cached_lists_the_official_files() {
    let root = tempfile::tempdir().unwrap();
    let cache = HubCache::new(root.path());
    let err =
        resolve("Salesforce/xgen-7b-8k-inst", "main", &cache, Network::Offline).unwrap_err().to_string();
    for f in ALL {
        assert!(err.contains(f), "{err} lacks {f}");
    }
}

#[test]
fn local_directories_and_bad_ids() {
    let dir = tempfile::tempdir().unwrap();
    let cache = HubCache::new(dir.path());
    assert_eq!(resolve(dir.path().to_str().unwrap(), "main", &cache, Network::Offline).unwrap(), dir.path());
    let err = resolve("./no/such/dir", "main", &cache, Network::Offline).unwrap_err().to_string();
    assert!(err.contains("no such directory"), "{err}");
    assert!(!Path::new("org/name").exists());
}

#[test]
fn cache_location_follows_huggingface_hub() {
    let env = |pairs: &'static [(&'static str, &'static str)]| {
        HubCache::from_lookup(move |k| pairs.iter().find(|(n, _)| *n == k).map(|(_, v)| (*v).into())).root
    };
    assert_eq!(env(&[("HF_HUB_CACHE", "/c"), ("HF_HOME", "/h"), ("HOME", "/u")]), Path::new("/c"));
    assert_eq!(env(&[("HF_HOME", "/h"), ("XDG_CACHE_HOME", "/x"), ("HOME", "/u")]), Path::new("/h/hub"));
    assert_eq!(env(&[("XDG_CACHE_HOME", "/x"), ("HOME", "/u")]), Path::new("/x/huggingface/hub"));
    assert_eq!(env(&[("HOME", "/u"), ("HF_HOME", "")]), Path::new("/u/.cache/huggingface/hub"));
}
