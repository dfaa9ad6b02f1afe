//! What the property tests share: their proptest configuration.

use proptest::test_runner::{Config, FileFailurePersistence, RngSeed};

/// `cases` cases (each property's default keeps `cargo test` fast), or `PROPTEST_CASES` for
/// long runs. The seed is random unless `PROPTEST_RNG_SEED` is set, and always printed: a
/// failing run is replayed with `PROPTEST_RNG_SEED=<seed>` (and the same `PROPTEST_CASES`).
pub fn config(cases: u32) -> Config {
    // `Config::default()` already reads every `PROPTEST_*` variable.
    let mut config = Config::default();
    if std::env::var_os("PROPTEST_CASES").is_none() {
        config.cases = cases;
    }
    let seed = match config.rng_seed {
        RngSeed::Fixed(seed) => seed,
        RngSeed::Random => rand::random(),
    };
    config.rng_seed = RngSeed::Fixed(seed);
    // Failing cases are kept next to the test (`<test>.proptest-regressions`, checked in) and
    // run first every time.
    config.failure_persistence = Some(Box::new(FileFailurePersistence::WithSource("proptest-regressions")));
    eprintln!("seed: {seed} (replay with PROPTEST_RNG_SEED={seed}), {} cases", config.cases);
    config
}
