//! Strict assertions: invariants of the engine that are cheap to check but sit on paths
//! too hot (or too numerous) for an `assert!` in production builds. Compiled in with
//! `debug_assertions` (CI's `ci` test profile turns them on) or the `strict-assertions`
//! feature; otherwise they cost nothing.

/// Like `assert!`, when strict assertions are compiled in.
macro_rules! strict_assert {
    ($($arg:tt)*) => {
        if cfg!(any(debug_assertions, feature = "strict-assertions")) {
            assert!($($arg)*);
        }
    };
}

/// Like `assert_eq!`, when strict assertions are compiled in.
macro_rules! strict_assert_eq {
    ($($arg:tt)*) => {
        if cfg!(any(debug_assertions, feature = "strict-assertions")) {
            assert_eq!($($arg)*);
        }
    };
}

pub(crate) use {strict_assert, strict_assert_eq};
