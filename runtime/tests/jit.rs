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
