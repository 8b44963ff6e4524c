//! The valid range of every number a request or a command-line flag can give the engine,
//! in one table: the server answers a value outside it with a 400 that names the field,
//! the CLI with a usage error, so the two cannot drift apart.
//!
//! The names are the request fields' (OpenAI's, llama-server's and Ollama's `options`);
//! the CLI's flags are the same words with dashes.

/// One end of a range.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Bound {
    /// The value may equal it.
    Incl(f64),
    /// The value must be strictly beyond it.
    Excl(f64),
    /// No limit on this side.
    Open,
}

/// A numeric parameter: its name, whether it must be an integer, its range and what the
/// special values mean.
#[derive(Clone, Copy, Debug)]
pub struct Param {
    pub name: &'static str,
    pub integer: bool,
    pub min: Bound,
    pub max: Bound,
    /// The range and special values in words, for error messages and the README.
    pub range: &'static str,
}

impl Param {
    /// Checks one value.
    ///
    /// # Errors
    /// A message naming the parameter, the range and the value given: not finite, not an
    /// integer where one is needed, or outside the range.
    pub fn check(&self, v: f64) -> Result<(), String> {
        let ok = v.is_finite()
            && (!self.integer || v.fract() == 0.0)
            && match self.min {
                Bound::Incl(m) => v >= m,
                Bound::Excl(m) => v > m,
                Bound::Open => true,
            }
            && match self.max {
                Bound::Incl(m) => v <= m,
                Bound::Excl(m) => v < m,
                Bound::Open => true,
            };
        if ok {
            Ok(())
        } else {
            Err(format!("{} must be {}, got {v}", self.name, self.range))
        }
    }

    /// Parses and checks a flag's text, for clap's `value_parser`.
    ///
    /// # Errors
    /// Not a number, or [`Param::check`]'s message.
    pub fn parse(&self, s: &str) -> Result<f64, String> {
        let v: f64 = s
            .trim()
            .parse()
            .map_err(|_| format!("{} must be a number, got {s:?}", self.name))?;
        self.check(v)?;
        Ok(v)
    }
}

const fn int(name: &'static str, min: Bound, max: Bound, range: &'static str) -> Param {
    Param {
        name,
        integer: true,
        min,
        max,
        range,
    }
}

const fn float(name: &'static str, min: Bound, max: Bound, range: &'static str) -> Param {
    Param {
        name,
        integer: false,
        min,
        max,
        range,
    }
}

/// The largest count any integer field takes (2^31 - 1, as llama.cpp's `int32_t`).
pub const MAX_COUNT: f64 = 2_147_483_647.0;

pub const TEMPERATURE: Param = float(
    "temperature",
    Bound::Incl(0.0),
    Bound::Incl(100.0),
    "between 0 and 100 (0 = greedy)",
);
pub const TOP_P: Param = float(
    "top_p",
    Bound::Incl(0.0),
    Bound::Incl(1.0),
    "between 0 and 1 (1 = off)",
);
pub const MIN_P: Param = float(
    "min_p",
    Bound::Incl(0.0),
    Bound::Incl(1.0),
    "between 0 and 1 (0 = off)",
);
pub const TOP_K: Param = int(
    "top_k",
    Bound::Incl(-1.0),
    Bound::Incl(MAX_COUNT),
    "an integer of at least -1 (0 or -1 = off)",
);
pub const REPEAT_PENALTY: Param = float(
    "repeat_penalty",
    Bound::Excl(0.0),
    Bound::Incl(10.0),
    "above 0 and at most 10 (1 = off)",
);
pub const REPEAT_LAST_N: Param = int(
    "repeat_last_n",
    Bound::Incl(-1.0),
    Bound::Incl(MAX_COUNT),
    "an integer of at least -1 (-1 = the whole context, 0 = off)",
);
pub const PRESENCE_PENALTY: Param = float(
    "presence_penalty",
    Bound::Incl(-2.0),
    Bound::Incl(2.0),
    "between -2 and 2 (0 = off)",
);
pub const FREQUENCY_PENALTY: Param = float(
    "frequency_penalty",
    Bound::Incl(-2.0),
    Bound::Incl(2.0),
    "between -2 and 2 (0 = off)",
);
/// Any 64-bit integer, signed or not; negative values wrap (llama.cpp's -1 is a seed too).
pub const SEED: Param = int(
    "seed",
    Bound::Incl(-9_223_372_036_854_775_808.0),
    Bound::Incl(18_446_744_073_709_551_615.0),
    "a 64-bit integer",
);
pub const MAX_TOKENS: Param = int(
    "max_tokens",
    Bound::Incl(0.0),
    Bound::Incl(MAX_COUNT),
    "an integer from 0 to 2147483647",
);
pub const MAX_COMPLETION_TOKENS: Param = Param {
    name: "max_completion_tokens",
    ..MAX_TOKENS
};
/// Ollama's answer length: -1 = until the context ends, -2 = fill the context.
pub const NUM_PREDICT: Param = int(
    "num_predict",
    Bound::Incl(-2.0),
    Bound::Incl(MAX_COUNT),
    "an integer from -2 to 2147483647 (-1 = until the context is full)",
);
pub const NUM_CTX: Param = int(
    "num_ctx",
    Bound::Incl(16.0),
    Bound::Incl(MAX_COUNT),
    "an integer from 16 to 2147483647 (capped at the server's context size)",
);
/// Choices per request.
pub const N: Param = int(
    "n",
    Bound::Incl(1.0),
    Bound::Incl(16.0),
    "an integer from 1 to 16",
);
/// Alternatives reported per token (chat's `top_logprobs`).
pub const TOP_LOGPROBS: Param = int(
    "top_logprobs",
    Bound::Incl(0.0),
    Bound::Incl(20.0),
    "an integer from 0 to 20",
);
/// Alternatives reported per token (the legacy completions `logprobs`).
pub const LOGPROBS: Param = Param {
    name: "logprobs",
    ..TOP_LOGPROBS
};

/// The sampling parameters, as [`crate::SamplerParams`] holds them.
pub const SAMPLING: [&Param; 9] = [
    &TEMPERATURE,
    &TOP_K,
    &TOP_P,
    &MIN_P,
    &REPEAT_PENALTY,
    &REPEAT_LAST_N,
    &PRESENCE_PENALTY,
    &FREQUENCY_PENALTY,
    &SEED,
];

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bounds_are_kept_and_named() {
        assert!(REPEAT_PENALTY.check(1.1).is_ok());
        assert!(REPEAT_PENALTY.check(10.0).is_ok());
        for bad in [0.0, -1.0, 10.5, f64::NAN, f64::INFINITY] {
            let e = REPEAT_PENALTY.check(bad).unwrap_err();
            assert!(e.starts_with("repeat_penalty must be above 0"), "{e}");
        }
        assert!(REPEAT_LAST_N.check(-1.0).is_ok());
        assert!(REPEAT_LAST_N.check(-2.0).is_err());
        assert!(REPEAT_LAST_N.check(1.5).is_err(), "not an integer");
        assert!(TEMPERATURE.check(0.0).is_ok());
        assert!(TEMPERATURE.check(-0.1).is_err());
        assert!(SEED.check(-1.0).is_ok());
        assert!(N.check(0.0).is_err() && N.check(17.0).is_err() && N.check(16.0).is_ok());
        assert_eq!(
            MAX_COMPLETION_TOKENS.check(-1.0).unwrap_err(),
            "max_completion_tokens must be an integer from 0 to 2147483647, got -1"
        );
    }

    #[test]
    fn flags_parse_through_the_same_ranges() {
        assert_eq!(TOP_P.parse(" 0.5 "), Ok(0.5));
        assert!(TOP_P.parse("1.5").unwrap_err().contains("between 0 and 1"));
        assert!(TOP_P.parse("abc").unwrap_err().contains("must be a number"));
    }
}
