//! JIT regions: code generated at run time, registered, probed, removed.
#![allow(unsafe_code)]
// Test code calls assembly targets, libc and probert's unsafe attach on
// purpose; the safety premise of every such call is the test itself.
#![allow(clippy::undocumented_unsafe_blocks)]

mod common;

use std::sync::atomic::{AtomicU64, Ordering};

use common::{bytes, count, counter};
use probert::{Error, RegionDesc};

/// `push rbp; mov rbp, rsp; lea rax, [rdi + 1]; pop rbp; ret` then
/// `mov rax, [rip - 0x20]`-free padding: the function is position-independent.
const CODE: [u8; 11] = [
    0x55, 0x48, 0x89, 0xE5, 0x48, 0x8D, 0x47, 0x01, 0x5D, 0xC3, 0xCC,
];

/// Maps one page, fills it with `CODE`, and makes it read-execute. The page
/// stays mapped for the rest of the (test's own) process.
fn jit_page() -> usize {
    let mut page = region::alloc(4096, region::Protection::READ_WRITE).expect("alloc");
    let p = page.as_mut_ptr::<u8>();
    unsafe {
        std::ptr::copy_nonoverlapping(CODE.as_ptr(), p, CODE.len());
        region::protect(p, 4096, region::Protection::READ_EXECUTE).expect("protect");
    }
    std::mem::forget(page);
    p as usize
}

fn call(addr: usize, x: u64) -> u64 {
    let f: extern "C" fn(u64) -> u64 = unsafe { std::mem::transmute(addr) };
    f(x)
}

isolated!(region_add_attach_remove_restores, {
    static HITS: AtomicU64 = AtomicU64::new(0);
    let page = jit_page();
    let region = probert::region_add(RegionDesc {
        start: page,
        len: 4096,
        name: "jit".into(),
        write: None,
    })
    .unwrap();
    let id = unsafe { probert::attach(page, count, counter(&HITS)) }.unwrap();
    let id2 = unsafe { probert::attach(page + 4, count, counter(&HITS)) }.unwrap();
    assert_eq!(call(page, 41), 42);
    assert_eq!(HITS.load(Ordering::SeqCst), 2);
    // Boundaries are checked from the region's start.
    let err = unsafe { probert::attach(page + 2, count, counter(&HITS)) }.unwrap_err();
    assert_eq!(
        err,
        Error::Misaligned {
            addr: page + 2,
            func: page
        }
    );
    probert::region_remove(region).unwrap();
    assert_eq!(bytes(page, CODE.len()), CODE, "restored byte for byte");
    assert_eq!(
        probert::detach(id),
        Err(Error::NotFound),
        "detached by region_remove"
    );
    assert_eq!(probert::detach(id2), Err(Error::NotFound));
    assert_eq!(probert::region_remove(region), Err(Error::NotFound));
    // Unregistered anonymous memory is no region.
    let err = unsafe { probert::attach(page, count, counter(&HITS)) }.unwrap_err();
    assert_eq!(err, Error::NoRegion { addr: page });
    assert_eq!(call(page, 1), 2);
});

isolated!(overlapping_regions_are_refused, {
    let page = jit_page();
    let desc = |start, len| RegionDesc {
        start,
        len,
        name: "r".into(),
        write: None,
    };
    let a = probert::region_add(desc(page, 2048)).unwrap();
    for (s, l) in [
        (page, 1),
        (page + 2047, 2),
        (page - 16, 17),
        (page - 16, 4096),
    ] {
        let err = probert::region_add(desc(s, l)).unwrap_err();
        assert!(
            matches!(err, Error::RegionOverlap { .. }),
            "{s:#x}+{l}: {err}"
        );
    }
    let b = probert::region_add(desc(page + 2048, 2048)).unwrap();
    let err = probert::region_add(desc(page, 0)).unwrap_err();
    assert!(matches!(err, Error::InvalidArgument(_)));
    probert::region_remove(a).unwrap();
    probert::region_remove(b).unwrap();
});

isolated!(write_callback_region_dual_mapped, {
    // A memfd mapped twice: RW for the JIT's writes, RX for execution. The
    // executable view is never writable, so probert must use the callback.
    static HITS: AtomicU64 = AtomicU64::new(0);
    static WRITES: AtomicU64 = AtomicU64::new(0);
    let (rw, rx) = unsafe {
        let fd = libc::memfd_create(c"probert-jit".as_ptr(), 0);
        assert!(fd >= 0);
        assert_eq!(libc::ftruncate(fd, 4096), 0);
        let rw = libc::mmap(
            std::ptr::null_mut(),
            4096,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_SHARED,
            fd,
            0,
        );
        let rx = libc::mmap(
            std::ptr::null_mut(),
            4096,
            libc::PROT_READ | libc::PROT_EXEC,
            libc::MAP_SHARED,
            fd,
            0,
        );
        assert!(rw != libc::MAP_FAILED && rx != libc::MAP_FAILED);
        std::ptr::copy_nonoverlapping(CODE.as_ptr(), rw.cast(), CODE.len());
        (rw as usize, rx as usize)
    };
    let region = probert::region_add(RegionDesc {
        start: rx,
        len: 4096,
        name: "dual".into(),
        write: Some(Box::new(move |dst: usize, src: &[u8]| {
            WRITES.fetch_add(1, Ordering::SeqCst);
            let off = dst
                .checked_sub(rx)
                .filter(|o| o + src.len() <= 4096)
                .ok_or("out of range")?;
            unsafe {
                std::ptr::copy_nonoverlapping(src.as_ptr(), (rw + off) as *mut u8, src.len())
            };
            Ok(())
        })),
    })
    .unwrap();
    let id = unsafe { probert::attach(rx, count, counter(&HITS)) }.unwrap();
    assert_eq!(WRITES.load(Ordering::SeqCst), 1);
    assert_eq!(call(rx, 9), 10);
    assert_eq!(HITS.load(Ordering::SeqCst), 1);
    probert::detach(id).unwrap();
    assert_eq!(bytes(rx, CODE.len()), CODE);
    assert_eq!(WRITES.load(Ordering::SeqCst), 2);
    probert::region_remove(region).unwrap();
    assert_eq!(common::has_wx_mapping(), None);
});

isolated!(failing_write_callback_changes_nothing, {
    static HITS: AtomicU64 = AtomicU64::new(0);
    let page = jit_page();
    let region = probert::region_add(RegionDesc {
        start: page,
        len: 4096,
        name: "ro".into(),
        write: Some(Box::new(|_, _| Err("read-only by policy".into()))),
    })
    .unwrap();
    let err = unsafe { probert::attach(page, count, counter(&HITS)) }.unwrap_err();
    assert!(
        matches!(err, Error::Protect { addr, .. } if addr == page),
        "{err}"
    );
    assert_eq!(probert::probe_count(), 0);
    assert_eq!(bytes(page, CODE.len()), CODE);
    probert::region_remove(region).unwrap();
});

/// `mov eax, 0xCD000000; add eax, edi; ret`: the `add` (at +5) starts with
/// `03` right after a `cd` byte, so a trap there whose `int3` is gone looks
/// like someone else's two-byte `int 3` (`cd 03`).
const CD03: [u8; 8] = [0xB8, 0x00, 0x00, 0x00, 0xCD, 0x03, 0xC7, 0xC3];
/// Where [`CD03`]'s `add` is.
const CD03_SITE: usize = 5;

/// Two read-execute pages: [`CD03`] at the start of the first, a real
/// `int 3` (`cd 03`) at +0x40, and one-byte NOPs everywhere else (every
/// byte an instruction boundary).
fn cd03_pages() -> usize {
    let mut pages = region::alloc(8192, region::Protection::READ_WRITE).expect("alloc");
    let p = pages.as_mut_ptr::<u8>();
    unsafe {
        std::ptr::write_bytes(p, 0x90, 8192);
        std::ptr::copy_nonoverlapping(CD03.as_ptr(), p, CD03.len());
        std::ptr::copy_nonoverlapping([0xCDu8, 0x03].as_ptr(), p.add(0x40), 2);
        region::protect(p, 8192, region::Protection::READ_EXECUTE).expect("protect");
    }
    std::mem::forget(pages);
    p as usize
}

/// The slot the trap path's old table of recent removals (4,096
/// direct-mapped entries) gave an address.
fn old_recent_slot(addr: usize) -> u64 {
    (addr as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 52
}

isolated!(a_late_trap_at_a_removed_cd03_lookalike_restarts, {
    // A trap that happened before its probe was removed, and looks up only
    // afterwards, must re-execute the restored instruction — even when the
    // bytes there look like a foreign `cd 03` and another removal came in
    // between (which evicted the old table's entry).
    static HITS: AtomicU64 = AtomicU64::new(0);
    let base = cd03_pages();
    let region = probert::region_add(RegionDesc {
        start: base,
        len: 8192,
        name: "cd03".into(),
        write: None,
    })
    .unwrap();
    let site = base + CD03_SITE;
    let collider = (base + 0x80..base + 8192)
        .find(|&a| old_recent_slot(a) == old_recent_slot(site))
        .expect("an address that shared the old table's slot");
    let id = unsafe { probert::attach(site, count, counter(&HITS)) }.unwrap();
    assert_eq!(probert::__fuzz::late_trap(site), "probe");
    probert::detach(id).unwrap();
    assert_eq!(call(base, 7), 0xCD00_0007);
    let other = unsafe { probert::attach(collider, count, counter(&HITS)) }.unwrap();
    probert::detach(other).unwrap();
    assert_eq!(probert::__fuzz::late_trap(site), "restart");
    assert_eq!(probert::__fuzz::late_trap(collider), "restart");
    // A trap at code probert never touched that really is `cd 03`'s tail
    // is still someone else's.
    assert_eq!(probert::__fuzz::late_trap(base + 0x41), "foreign");
    // A thread scan shows no thread can still be between a trap at the
    // removed site and its lookup: the tombstone goes, and the bytes alone
    // decide again.
    probert::recycle_stubs().unwrap();
    assert_eq!(probert::__fuzz::late_trap(site), "foreign");
    assert_eq!(probert::__fuzz::late_trap(collider), "restart");
    probert::region_remove(region).unwrap();
});

isolated!(a_failed_attach_batch_leaves_late_traps_restartable, {
    // The first site's trap is written, the second write fails, the first
    // is restored: a thread that trapped at the first site in between must
    // still re-execute it.
    static HITS: AtomicU64 = AtomicU64::new(0);
    let base = cd03_pages();
    let mem = std::fs::OpenOptions::new()
        .write(true)
        .open("/proc/self/mem")
        .expect("/proc/self/mem");
    let region = probert::region_add(RegionDesc {
        start: base,
        len: 8192,
        name: "half-writable".into(),
        write: Some(Box::new(move |dst: usize, src: &[u8]| {
            if dst >= base + 4096 {
                return Err("the second page refuses writes".into());
            }
            std::os::unix::fs::FileExt::write_all_at(&mem, src, dst as u64)
                .map_err(|e| e.to_string())
        })),
    })
    .unwrap();
    let reqs = [base + CD03_SITE, base + 4096 + 16].map(|addr| probert::AttachReq {
        addr,
        handler: count,
        user_data: counter(&HITS),
    });
    let (index, err) = probert::attach_batch(&reqs).unwrap_err();
    assert_eq!(index, 1, "{err}");
    assert_eq!(bytes(base, CD03.len()), CD03, "the first trap was undone");
    assert_eq!(probert::probe_count(), 0);
    assert_eq!(probert::__fuzz::late_trap(base + CD03_SITE), "restart");
    probert::region_remove(region).unwrap();
});

isolated!(a_late_flush_never_lands_in_a_reused_consumer_record, {
    // A thread's hit cache still holds a detached consumer's count when its
    // record is reused 65,536 times (the reuse count at which the old 16-bit
    // generation check let the flush through); the new consumer's first hit
    // evicts that entry. Its statistics must count its own hit only.
    static OLD: AtomicU64 = AtomicU64::new(0);
    static NEW: AtomicU64 = AtomicU64::new(0);
    let page = jit_page();
    let region = probert::region_add(RegionDesc {
        start: page,
        len: 4096,
        name: "reuse".into(),
        write: None,
    })
    .unwrap();
    let old =
        unsafe { probert::attach_ex(page, count, counter(&OLD), probert::Mode::Trap) }.unwrap();
    for _ in 0..5 {
        assert_eq!(call(page, 1), 2);
    }
    probert::detach(old).unwrap();
    for _ in 0..65_535 {
        let id =
            unsafe { probert::attach_ex(page, count, counter(&OLD), probert::Mode::Trap) }.unwrap();
        probert::detach(id).unwrap();
    }
    let new =
        unsafe { probert::attach_ex(page, count, counter(&NEW), probert::Mode::Trap) }.unwrap();
    assert_eq!(call(page, 1), 2);
    assert_eq!(NEW.load(Ordering::SeqCst), 1);
    assert_eq!(
        probert::stats(new).unwrap().hits,
        1,
        "another consumer's hits were flushed into this one's record"
    );
    probert::detach(new).unwrap();
    probert::region_remove(region).unwrap();
});

isolated!(
    a_trap_byte_inside_an_instruction_is_misaligned_not_a_conflict,
    {
        // `mov eax, 0xCCCCCCCC; ret`: the immediate's bytes are 0xCC, but they
        // are inside the `mov`; only an `int3` at a boundary is someone else's.
        static HITS: AtomicU64 = AtomicU64::new(0);
        let mut page = region::alloc(4096, region::Protection::READ_WRITE).expect("alloc");
        let p = page.as_mut_ptr::<u8>();
        let code = [0xB8, 0xCC, 0xCC, 0xCC, 0xCC, 0xC3, 0xCC];
        unsafe {
            std::ptr::copy_nonoverlapping(code.as_ptr(), p, code.len());
            region::protect(p, 4096, region::Protection::READ_EXECUTE).expect("protect");
        }
        let base = p as usize;
        let region = probert::region_add(RegionDesc {
            start: base,
            len: code.len(),
            name: "cc".into(),
            write: None,
        })
        .unwrap();
        for off in 1..5 {
            let err = unsafe { probert::attach(base + off, count, counter(&HITS)) }.unwrap_err();
            assert!(matches!(err, Error::Misaligned { .. }), "+{off}: {err}");
        }
        let err = unsafe { probert::attach(base + 6, count, counter(&HITS)) }.unwrap_err();
        assert!(matches!(err, Error::Conflict { .. }), "+6: {err}");
        probert::region_remove(region).unwrap();
        drop(page);
    }
);

isolated!(a_failed_reap_is_reported_by_the_next_sync, {
    // A handler returns `Remove`; by the time a control call reaps it, its
    // region's write callback fails, so the probe's code cannot be
    // restored. That error is not dropped: `sync` reports it, and the reap
    // is retried until it succeeds.
    static FAIL: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);
    unsafe extern "C" fn remove(_: *mut probert::Hit) -> u32 {
        probert::Action::Remove as u32
    }
    let page = jit_page();
    let region = probert::region_add(RegionDesc {
        start: page,
        len: 4096,
        name: "flaky".into(),
        write: Some(Box::new(move |dst: usize, src: &[u8]| {
            if FAIL.load(Ordering::SeqCst) {
                return Err("read-only by policy now".into());
            }
            let off = dst
                .checked_sub(page)
                .filter(|o| o + src.len() <= 4096)
                .ok_or("out of range")?;
            unsafe {
                region::protect(
                    (page + off) as *const u8,
                    src.len(),
                    region::Protection::READ_WRITE_EXECUTE,
                )
                .map_err(|e| e.to_string())?;
                std::ptr::copy_nonoverlapping(src.as_ptr(), (page + off) as *mut u8, src.len());
                region::protect(
                    (page + off) as *const u8,
                    src.len(),
                    region::Protection::READ_EXECUTE,
                )
                .map_err(|e| e.to_string())?;
            }
            Ok(())
        })),
    })
    .unwrap();
    let id = unsafe { probert::attach(page, remove, std::ptr::null_mut()) }.unwrap();
    assert_eq!(call(page, 9), 10, "this call returns Remove");
    FAIL.store(true, Ordering::SeqCst);
    let err = probert::sync().expect_err("the failed reap is reported");
    assert!(
        matches!(err, Error::Protect { addr, .. } if addr == page),
        "{err}"
    );
    // Still failing: the reap is tried again (the consumer stays removed,
    // its probe armed) and reported again.
    assert!(probert::sync().is_err(), "still failing");
    FAIL.store(false, Ordering::SeqCst);
    assert_eq!(probert::sync(), Ok(()), "the retried reap succeeded");
    assert_eq!(bytes(page, CODE.len()), CODE, "restored");
    assert_eq!(probert::probe_count(), 0);
    assert_eq!(probert::detach(id), Err(Error::NotFound));
    assert_eq!(call(page, 1), 2);
    probert::region_remove(region).unwrap();
});
