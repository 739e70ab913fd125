//! The atomics of the lock-free modules (`map`, `grace`): `std`'s, or loom's
//! when the crate's loom models run (`RUSTFLAGS="--cfg loom" cargo test
//! --lib loom`), so that loom checks the production code itself.
//!
//! Production builds re-export `std::sync::atomic` unchanged: no wrapper, no
//! indirection.
//!
//! `Const*` are the types of fields of values that live in `static`s built
//! by a `const fn` (`trap::INDEX`, `__fuzz::LatchIndex`): `std`'s atomics
//! again in production. Loom's constructors are not `const`, so under loom
//! they are wrappers that create their loom atomic on first use and
//! dereference to it (call sites are the same code). A `static` one is never
//! touched by a model — a loom atomic belongs to one execution — models build
//! their own values. Loom records an atomic's creation as a non-atomic write
//! by the creating thread, so a model must touch such a field before it
//! starts the threads that share it; if it does not, loom reports a
//! causality violation (a false alarm, never a missed bug).
//!
//! # Safety
//!
//! Under loom only: the wrapper of `AtomicPtr` holds its initial pointer and
//! is declared `Send`/`Sync` like `std::sync::atomic::AtomicPtr`.
#![cfg_attr(all(test, loom), allow(unsafe_code))]

#[cfg(not(all(test, loom)))]
pub(crate) use std::sync::atomic::{
    fence, AtomicPtr as ConstAtomicPtr, AtomicU64, AtomicU64 as ConstAtomicU64, AtomicUsize,
    AtomicUsize as ConstAtomicUsize, Ordering,
};

/// Hint for a spin-wait. Under loom, a yield: loom must run the thread that
/// the spinning one waits for.
#[cfg(not(all(test, loom)))]
#[inline(always)]
pub(crate) fn spin_loop() {
    std::hint::spin_loop();
}

#[cfg(all(test, loom))]
pub(crate) use loom::sync::atomic::{fence, AtomicU64, AtomicUsize, Ordering};
#[cfg(all(test, loom))]
pub(crate) use loom_shim::{model, spin_loop, ConstAtomicPtr, ConstAtomicU64, ConstAtomicUsize};

#[cfg(all(test, loom))]
mod loom_shim {
    use std::ops::Deref;
    use std::sync::OnceLock;

    pub(crate) fn spin_loop() {
        loom::thread::yield_now();
    }

    /// Runs a loom model with at most 3 preemptions per execution (unless
    /// `LOOM_MAX_PREEMPTIONS` says otherwise): bugs need few preemptions,
    /// and the unbounded search of these models takes hours.
    pub(crate) fn model(f: impl Fn() + Sync + Send + 'static) {
        let mut builder = loom::model::Builder::new();
        if builder.preemption_bound.is_none() {
            builder.preemption_bound = Some(3);
        }
        builder.check(f);
    }

    macro_rules! lazy_int {
        ($name:ident, $loom:ident, $t:ty) => {
            /// A loom atomic created on first use (see the module docs).
            #[derive(Debug)]
            pub(crate) struct $name {
                init: $t,
                cell: OnceLock<loom::sync::atomic::$loom>,
            }

            impl $name {
                pub(crate) const fn new(init: $t) -> Self {
                    Self {
                        init,
                        cell: OnceLock::new(),
                    }
                }
            }

            impl Deref for $name {
                type Target = loom::sync::atomic::$loom;

                fn deref(&self) -> &Self::Target {
                    self.cell
                        .get_or_init(|| loom::sync::atomic::$loom::new(self.init))
                }
            }
        };
    }

    lazy_int!(ConstAtomicU64, AtomicU64, u64);
    lazy_int!(ConstAtomicUsize, AtomicUsize, usize);

    /// A loom `AtomicPtr` created on first use (see the module docs).
    #[derive(Debug)]
    pub(crate) struct ConstAtomicPtr<T> {
        init: *mut T,
        cell: OnceLock<loom::sync::atomic::AtomicPtr<T>>,
    }

    // SAFETY: `init` is only copied into the loom atomic, as
    // `std::sync::atomic::AtomicPtr` is `Send + Sync` for every `T`.
    unsafe impl<T> Send for ConstAtomicPtr<T> {}
    // SAFETY: as above.
    unsafe impl<T> Sync for ConstAtomicPtr<T> {}

    impl<T> ConstAtomicPtr<T> {
        pub(crate) const fn new(init: *mut T) -> Self {
            Self {
                init,
                cell: OnceLock::new(),
            }
        }
    }

    impl<T> Deref for ConstAtomicPtr<T> {
        type Target = loom::sync::atomic::AtomicPtr<T>;

        fn deref(&self) -> &Self::Target {
            self.cell
                .get_or_init(|| loom::sync::atomic::AtomicPtr::new(self.init))
        }
    }
}
