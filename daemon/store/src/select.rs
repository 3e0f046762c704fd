//! Which files of a repository a pull fetches.
//!
//! By default: configs, tokenizer files, chat templates and weights. Weights are the
//! safetensors when the repository has any (outside `original/`); then `.bin`/`.pth`/`.pt`
//! pickles, GGUF files and the `original/` folder (Meta's consolidated checkpoints) are skipped.
//! Repositories without safetensors get their `.bin`/`.pth`/`.pt` weights. `--include` replaces
//! the default selection; `--exclude` is applied last. Globs follow `fnmatch` as
//! huggingface_hub uses it: `*` also matches `/`.
//!
//! A checked pull fetches the selected [metadata](is_metadata_file) files first and the rest
//! only once the caller's check has seen them.

use globset::{Glob, GlobSet, GlobSetBuilder};

use crate::StoreError;

/// Compiled `--include`/`--exclude` patterns.
#[derive(Debug, Clone)]
pub struct FileFilter {
    include: Option<GlobSet>,
    exclude: Option<GlobSet>,
}

/// File names (last path segment) fetched by default besides the extensions below.
const DEFAULT_NAMES: &[&str] =
    &["tokenizer.model", "merges.txt", "vocab.txt", "spiece.model", "sentencepiece.bpe.model"];
/// Extensions fetched by default: configs, tokenizers, chat templates.
const DEFAULT_EXTENSIONS: &[&str] = &["json", "jinja", "tiktoken", "model", "txt"];
/// Pickled or alternative weight formats skipped when safetensors exist.
const PICKLE_EXTENSIONS: &[&str] = &["bin", "pth", "pt"];
/// Extensions of weight files: safetensors, the pickles and GGUF.
const WEIGHT_EXTENSIONS: &[&str] = &["safetensors", "bin", "pth", "pt", "gguf"];

fn build(globs: &[String]) -> Result<Option<GlobSet>, StoreError> {
    if globs.is_empty() {
        return Ok(None);
    }
    let mut b = GlobSetBuilder::new();
    for g in globs {
        let glob =
            Glob::new(g).map_err(|e| StoreError::InvalidGlob { glob: g.clone(), message: e.kind().to_string() })?;
        b.add(glob);
    }
    b.build().map(Some).map_err(|e| StoreError::InvalidGlob { glob: globs.join(","), message: e.to_string() })
}

fn extension(path: &str) -> &str {
    let name = path.rsplit('/').next().unwrap_or(path);
    name.rsplit_once('.').map(|(_, ext)| ext).unwrap_or("")
}

impl FileFilter {
    /// Compiles the patterns; an invalid glob is an `InvalidGlob` error naming it.
    pub fn new(include: &[String], exclude: &[String]) -> Result<FileFilter, StoreError> {
        Ok(FileFilter { include: build(include)?, exclude: build(exclude)? })
    }

    /// Returns the selected subset of `paths` (all files of the repository), in input order.
    pub fn select<'a>(&self, paths: &[&'a str]) -> Vec<&'a str> {
        let has_safetensors = paths.iter().any(|p| extension(p) == "safetensors" && !p.starts_with("original/"));
        paths
            .iter()
            .copied()
            .filter(|p| match &self.include {
                Some(set) => set.is_match(p),
                None => default_selected(p, has_safetensors),
            })
            .filter(|p| self.exclude.as_ref().is_none_or(|set| !set.is_match(p)))
            .collect()
    }
}

/// Whether `path` is a weight file (`*.safetensors`, a PyTorch pickle or GGUF).
pub fn is_weight_file(path: &str) -> bool {
    WEIGHT_EXTENSIONS.contains(&extension(path))
}

/// Whether `path` is a small file that describes the model: configs, tokenizer files, chat
/// templates (what the default selection takes besides weights, outside `original/`).
pub fn is_metadata_file(path: &str) -> bool {
    !is_weight_file(path) && default_selected(path, true)
}

fn default_selected(path: &str, has_safetensors: bool) -> bool {
    if has_safetensors && path.starts_with("original/") {
        return false;
    }
    let name = path.rsplit('/').next().unwrap_or(path);
    let ext = extension(path);
    if ext == "safetensors" {
        return true;
    }
    if PICKLE_EXTENSIONS.contains(&ext) {
        return !has_safetensors;
    }
    // Text files other than the known tokenizer ones (README-like notes, requirements.txt) are
    // not needed to serve the model.
    if ext == "txt" {
        return DEFAULT_NAMES.contains(&name);
    }
    DEFAULT_NAMES.contains(&name) || DEFAULT_EXTENSIONS.contains(&ext)
}

#[cfg(test)]
mod tests {
    use super::*;

    const REPO: &[&str] = &[
        ".gitattributes",
        "README.md",
        "config.json",
        "generation_config.json",
        "tokenizer.json",
        "tokenizer_config.json",
        "tokenizer.model",
        "merges.txt",
        "requirements.txt",
        "chat_template.jinja",
        "model-00001-of-00002.safetensors",
        "model-00002-of-00002.safetensors",
        "model.safetensors.index.json",
        "pytorch_model.bin",
        "consolidated.pth",
        "model.gguf",
        "original/params.json",
        "original/consolidated.00.pth",
    ];

    #[test]
    fn default_selection_prefers_safetensors() {
        let f = FileFilter::new(&[], &[]).unwrap();
        assert_eq!(
            f.select(REPO),
            vec![
                "config.json",
                "generation_config.json",
                "tokenizer.json",
                "tokenizer_config.json",
                "tokenizer.model",
                "merges.txt",
                "chat_template.jinja",
                "model-00001-of-00002.safetensors",
                "model-00002-of-00002.safetensors",
                "model.safetensors.index.json",
            ]
        );
    }

    #[test]
    fn pickles_are_taken_without_safetensors() {
        let f = FileFilter::new(&[], &[]).unwrap();
        let repo = ["config.json", "pytorch_model.bin", "model.gguf", "original/params.json"];
        assert_eq!(f.select(&repo), vec!["config.json", "pytorch_model.bin", "original/params.json"]);
    }

    #[test]
    fn include_replaces_and_exclude_removes() {
        let f = FileFilter::new(&["*.gguf".into(), "config.json".into()], &[]).unwrap();
        assert_eq!(f.select(REPO), vec!["config.json", "model.gguf"]);
        let f = FileFilter::new(&[], &["model-00002*".into(), "*.jinja".into()]).unwrap();
        let sel = f.select(REPO);
        assert!(sel.contains(&"model-00001-of-00002.safetensors"));
        assert!(!sel.contains(&"model-00002-of-00002.safetensors") && !sel.contains(&"chat_template.jinja"));
        // `*` crosses `/` like fnmatch.
        let f = FileFilter::new(&["original/*".into()], &[]).unwrap();
        assert_eq!(f.select(REPO), vec!["original/params.json", "original/consolidated.00.pth"]);
    }

    #[test]
    fn metadata_and_weights_are_told_apart() {
        let meta: Vec<&str> = REPO.iter().copied().filter(|p| is_metadata_file(p)).collect();
        assert_eq!(
            meta,
            [
                "config.json",
                "generation_config.json",
                "tokenizer.json",
                "tokenizer_config.json",
                "tokenizer.model",
                "merges.txt",
                "chat_template.jinja",
                "model.safetensors.index.json",
            ]
        );
        let weights: Vec<&str> = REPO.iter().copied().filter(|p| is_weight_file(p)).collect();
        assert_eq!(
            weights,
            [
                "model-00001-of-00002.safetensors",
                "model-00002-of-00002.safetensors",
                "pytorch_model.bin",
                "consolidated.pth",
                "model.gguf",
                "original/consolidated.00.pth",
            ]
        );
    }

    #[test]
    fn bad_glob_is_named() {
        let err = FileFilter::new(&["a[".into()], &[]).unwrap_err().to_string();
        assert!(err.contains("`a[`"), "{err}");
    }
}
