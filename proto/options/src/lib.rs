//! The options that several layers of llmd share, each a typed enum defined once here: the
//! daemon's config and CLI, the control protocol, the engine and the HTTP layer all use these
//! types, so a value is parsed once at the edge (a config key, a `llmctl` flag, a protocol
//! field) and nothing further down matches on strings. Every enum serialises to the spelling
//! the config reference documents and parses through [`std::str::FromStr`] with an error that
//! names the accepted values.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// A value that is not one of an option's accepted spellings.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("`{value}` is not a valid {option} (expected one of: {expected})")]
pub struct ParseOptionError {
    /// Which option was being parsed (`dtype`, `device`, ...).
    pub option: &'static str,
    /// The rejected text.
    pub value: String,
    /// The accepted spellings, comma-separated.
    pub expected: &'static str,
}

/// Implements `Display`, `FromStr` and string serde for an option enum from one table of
/// `(variant, canonical name, extra accepted spellings)`.
macro_rules! string_option {
    ($ty:ident, $option:literal, $expected:literal, [$(($variant:ident, $name:literal $(, $alias:literal)*)),+ $(,)?]) => {
        impl $ty {
            /// Every value, in documentation order.
            pub const ALL: &'static [$ty] = &[$($ty::$variant),+];

            /// The canonical spelling (config files, protocol, `llmctl ps`).
            pub fn as_str(self) -> &'static str {
                match self {
                    $($ty::$variant => $name),+
                }
            }
        }

        impl fmt::Display for $ty {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(self.as_str())
            }
        }

        impl FromStr for $ty {
            type Err = ParseOptionError;

            fn from_str(s: &str) -> Result<Self, Self::Err> {
                match s.trim().to_ascii_lowercase().as_str() {
                    $($name $(| $alias)* => Ok($ty::$variant),)+
                    _ => Err(ParseOptionError { option: $option, value: s.to_string(), expected: $expected }),
                }
            }
        }

        impl Serialize for $ty {
            fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                s.serialize_str(self.as_str())
            }
        }

        impl<'de> Deserialize<'de> for $ty {
            fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                let s = String::deserialize(d)?;
                s.parse().map_err(serde::de::Error::custom)
            }
        }
    };
}

/// A floating-point type that weights, activations or the KV cache are held in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Dtype {
    BFloat16,
    Float16,
    Float32,
}

string_option!(
    Dtype,
    "dtype",
    "bfloat16, float16, float32",
    [
        (BFloat16, "bfloat16", "bf16"),
        (Float16, "float16", "fp16", "f16", "half"),
        (Float32, "float32", "fp32", "f32", "float"),
    ]
);

impl Dtype {
    /// Bytes of one element.
    pub fn size_bytes(self) -> usize {
        match self {
            Dtype::BFloat16 | Dtype::Float16 => 2,
            Dtype::Float32 => 4,
        }
    }
}

/// The `dtype` a user asks for: a fixed [`Dtype`] or `auto` (the backend's default for the
/// checkpoint: bfloat16 on CUDA, float32 on the CPU).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum DtypeChoice {
    #[default]
    Auto,
    Fixed(Dtype),
}

impl DtypeChoice {
    /// The canonical spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            DtypeChoice::Auto => "auto",
            DtypeChoice::Fixed(d) => d.as_str(),
        }
    }

    /// The fixed dtype, or `default` for `auto`.
    pub fn or(self, default: Dtype) -> Dtype {
        match self {
            DtypeChoice::Auto => default,
            DtypeChoice::Fixed(d) => d,
        }
    }
}

impl fmt::Display for DtypeChoice {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for DtypeChoice {
    type Err = ParseOptionError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if s.trim().eq_ignore_ascii_case("auto") {
            return Ok(DtypeChoice::Auto);
        }
        s.parse().map(DtypeChoice::Fixed).map_err(|_| ParseOptionError {
            option: "dtype",
            value: s.to_string(),
            expected: "auto, bfloat16, float16, float32",
        })
    }
}

impl Serialize for DtypeChoice {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.as_str())
    }
}

impl<'de> Deserialize<'de> for DtypeChoice {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// Where models run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum Device {
    /// CUDA when the build has it and a GPU is usable, else the CPU.
    #[default]
    Auto,
    Cpu,
    Cuda,
}

string_option!(Device, "device", "auto, cpu, cuda", [(Auto, "auto"), (Cpu, "cpu"), (Cuda, "cuda", "gpu")]);

/// The backend a model was actually placed on (`auto` resolved).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Backend {
    Cpu,
    Cuda,
}

string_option!(Backend, "backend", "cpu, cuda", [(Cpu, "cpu"), (Cuda, "cuda")]);

/// How reasoning text (`<think>...</think>`) is split from the answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum ReasoningParser {
    /// Output may start inside a reasoning block without an opening `<think>` (DeepSeek-R1 and
    /// its distills): everything before `</think>` is reasoning.
    DeepseekR1,
    /// Reasoning only when the output (or the generation prompt) opens `<think>` (Qwen3).
    Qwen3,
    /// No reasoning parsing.
    #[default]
    None,
}

string_option!(
    ReasoningParser,
    "reasoning_parser",
    "deepseek_r1, qwen3, none",
    [(DeepseekR1, "deepseek_r1"), (Qwen3, "qwen3"), (None, "none"),]
);

/// How a model writes tool calls in its output.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum ToolCallFormat {
    /// `<tool_call>{"name": ..., "arguments": {...}}</tool_call>` (Hermes, Qwen2.5/Qwen3).
    #[default]
    Hermes,
}

string_option!(ToolCallFormat, "tool_call_parser", "hermes", [(Hermes, "hermes")]);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dtype_spellings_and_error() {
        assert_eq!("bf16".parse::<Dtype>().unwrap(), Dtype::BFloat16);
        assert_eq!("half".parse::<Dtype>().unwrap(), Dtype::Float16);
        assert_eq!(" Float32 ".parse::<Dtype>().unwrap(), Dtype::Float32);
        let e = "int8".parse::<Dtype>().unwrap_err().to_string();
        assert_eq!(e, "`int8` is not a valid dtype (expected one of: bfloat16, float16, float32)");
        assert_eq!(Dtype::BFloat16.size_bytes(), 2);
        assert_eq!(Dtype::Float32.size_bytes(), 4);
    }

    #[test]
    fn dtype_choice_round_trips() {
        for c in [DtypeChoice::Auto, DtypeChoice::Fixed(Dtype::Float16)] {
            let json = serde_json::to_string(&c).unwrap();
            assert_eq!(serde_json::from_str::<DtypeChoice>(&json).unwrap(), c);
        }
        assert_eq!(serde_json::to_string(&DtypeChoice::Fixed(Dtype::BFloat16)).unwrap(), "\"bfloat16\"");
        assert_eq!(DtypeChoice::Auto.or(Dtype::Float32), Dtype::Float32);
        let e = serde_json::from_str::<DtypeChoice>("\"fp8\"").unwrap_err().to_string();
        assert!(e.contains("auto, bfloat16, float16, float32"), "{e}");
    }

    #[test]
    fn device_and_parser_names() {
        assert_eq!("CUDA".parse::<Device>().unwrap(), Device::Cuda);
        assert!("tpu".parse::<Device>().unwrap_err().to_string().contains("auto, cpu, cuda"));
        assert_eq!(serde_json::to_string(&ReasoningParser::DeepseekR1).unwrap(), "\"deepseek_r1\"");
        assert_eq!("qwen3".parse::<ReasoningParser>().unwrap(), ReasoningParser::Qwen3);
        assert_eq!(Backend::Cuda.to_string(), "cuda");
        assert_eq!(ToolCallFormat::ALL, &[ToolCallFormat::Hermes]);
    }
}
