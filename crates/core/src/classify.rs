//! Classification outputs into labels: softmax when the model gives logits, then the top k.

use std::path::Path;

use serde::Serialize;

use crate::config::ClassificationConfig;

/// One class of a prediction.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Class {
    pub label: String,
    pub index: usize,
    pub score: f32,
}

pub(crate) struct Classifier {
    /// Class names by index; empty when the config names no labels file.
    labels: Vec<String>,
    softmax: bool,
    top_k: usize,
    /// Output the scores come from.
    pub output: Option<String>,
}

impl Classifier {
    pub(crate) fn load(cfg: &ClassificationConfig) -> std::io::Result<Classifier> {
        let labels = match &cfg.labels {
            Some(p) => read_labels(p)?,
            None => Vec::new(),
        };
        Ok(Classifier {
            labels,
            softmax: cfg.softmax,
            top_k: cfg.top_k,
            output: cfg.output.clone(),
        })
    }

    /// How many labels the file named, when one was named.
    pub(crate) fn label_count(&self) -> Option<usize> {
        (!self.labels.is_empty()).then_some(self.labels.len())
    }

    /// The `top_k` classes of one row of scores, best first.
    pub(crate) fn top(&self, scores: &[f32]) -> Vec<Class> {
        let probs: Vec<f32> = if self.softmax {
            let max = scores.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            let exp: Vec<f64> = scores.iter().map(|&s| f64::from(s - max).exp()).collect();
            let sum: f64 = exp.iter().sum();
            exp.iter().map(|e| (e / sum) as f32).collect()
        } else {
            scores.to_vec()
        };
        let mut order: Vec<usize> = (0..probs.len()).collect();
        order.sort_by(|&a, &b| probs[b].total_cmp(&probs[a]).then(a.cmp(&b)));
        order
            .into_iter()
            .take(self.top_k)
            .map(|i| Class {
                label: self.labels.get(i).cloned().unwrap_or_else(|| i.to_string()),
                index: i,
                score: probs[i],
            })
            .collect()
    }
}

fn read_labels(path: &Path) -> std::io::Result<Vec<String>> {
    Ok(std::fs::read_to_string(path)?
        .lines()
        .map(|l| l.trim().to_string())
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn softmax_then_top_k() {
        let c = Classifier {
            labels: vec!["cat".into(), "dog".into(), "fish".into()],
            softmax: true,
            top_k: 2,
            output: None,
        };
        let top = c.top(&[1.0, 3.0, 2.0]);
        assert_eq!(
            top.iter().map(|c| c.label.as_str()).collect::<Vec<_>>(),
            ["dog", "fish"]
        );
        let z: f32 = [1.0f32, 3.0, 2.0].iter().map(|s| s.exp()).sum();
        assert!((top[0].score - 3f32.exp() / z).abs() < 1e-6);
        let raw = Classifier {
            softmax: false,
            labels: vec![],
            ..c
        };
        assert_eq!(
            raw.top(&[0.1, 0.7, 0.2])[0],
            Class {
                label: "1".into(),
                index: 1,
                score: 0.7
            }
        );
    }
}
