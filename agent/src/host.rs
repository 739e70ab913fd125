//! The plug-in ABI of `include/probert_tool.h`, mirrored in Rust, and the
//! host table every tool receives: libprobert's entry points (wrapping the
//! runtime's Rust API as `libprobert` does), the event buffers, the output.
//!
//! # Safety
//!
//! The structs are `#[repr(C)]` copies of the header's; tools are C code
//! that gets pointers to them. The wrappers check for NULL and read the
//! caller's arrays for the lengths it gives.
#![allow(unsafe_code)]
#![allow(non_camel_case_types)]

use std::ffi::{c_char, c_int, c_void, CStr};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;

use probert::{AttachOptions, AttachReq, ConsumerId, Handler, Mode, Reg, Regs};

use crate::events;

/// `PROBERT_TOOL_ABI`.
pub const ABI: u32 = 1;

/// `probert_tool_match`.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct ToolMatch {
    pub id: u32,
    pub spec_index: u32,
    pub spec: *const c_char,
    pub module: *const c_char,
    pub symbol: *const c_char,
    pub addr: usize,
    pub func_start: usize,
    pub func_end: usize,
    pub module_base: usize,
    pub is_entry: u32,
}

/// `probert_attach_req`.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct CAttachReq {
    pub addr: *const c_void,
    pub handler: Option<Handler>,
    pub user_data: *mut c_void,
}

/// `probert_attach_opts` (0.2).
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct AttachOpts {
    pub size: usize,
    pub mode: u32,
    pub on_return: Option<Handler>,
}

/// `probert_consumer_stats` (0.2).
#[repr(C)]
#[derive(Debug, Clone, Copy, Default)]
pub struct ConsumerStats {
    pub hits: u64,
    pub missed: u64,
    pub returns: u64,
    pub abandoned: u64,
}

/// `probert_tool_host`.
#[repr(C)]
#[derive(Debug)]
pub struct ToolHost {
    pub size: usize,
    pub abi: u32,
    pub json: u32,
    pub attach_ex: unsafe extern "C" fn(
        *const c_void,
        Option<Handler>,
        *mut c_void,
        *const AttachOpts,
        *mut u64,
    ) -> u32,
    pub attach_batch_ex: unsafe extern "C" fn(
        *const CAttachReq,
        usize,
        *const AttachOpts,
        *mut u64,
        *mut usize,
    ) -> u32,
    pub detach: extern "C" fn(u64) -> u32,
    pub consumer_get_stats: unsafe extern "C" fn(u64, *mut ConsumerStats) -> u32,
    pub symbol_addr: unsafe extern "C" fn(*const c_char, *const c_char, *mut *const c_void) -> u32,
    pub regs_get: unsafe extern "C" fn(*const Regs, u32) -> u64,
    pub regs_arg: unsafe extern "C" fn(*const Regs, u32) -> u64,
    pub emit: unsafe extern "C" fn(*mut ToolCtx, *const c_void, usize) -> c_int,
    pub now_ns: extern "C" fn() -> u64,
    pub is_agent_thread: extern "C" fn() -> c_int,
    pub print: unsafe extern "C" fn(*mut ToolCtx, *const c_char),
    pub write_file:
        unsafe extern "C" fn(*mut ToolCtx, *const c_char, *const c_void, usize) -> c_int,
    pub last_error: extern "C" fn() -> *const c_char,
    pub not_attached: unsafe extern "C" fn(*mut ToolCtx, *const ToolMatch, *const c_char),
    pub shared_counter:
        unsafe extern "C" fn(*mut ToolCtx, *const ToolMatch, *const c_char) -> *mut u64,
    pub is_agent_call: unsafe extern "C" fn(*const Regs) -> c_int,
}

/// `probert_tool`.
#[repr(C)]
#[derive(Debug)]
pub struct Tool {
    pub abi: u32,
    pub name: *const c_char,
    pub start:
        Option<unsafe extern "C" fn(*const ToolHost, *mut ToolCtx, *const c_char) -> *mut c_void>,
    pub attach: Option<unsafe extern "C" fn(*mut c_void, *const ToolMatch, usize) -> c_int>,
    pub event: Option<unsafe extern "C" fn(*mut c_void, *const c_void, usize)>,
    pub report: Option<unsafe extern "C" fn(*mut c_void, c_int)>,
    pub forked: Option<unsafe extern "C" fn(*mut c_void)>,
}

// SAFETY: a `Tool` is an immutable static description (pointers to static
// text and functions).
unsafe impl Sync for Tool {}

/// `probert_tool_ctx`: one tool in this process.
#[derive(Debug)]
pub struct ToolCtx {
    /// Its index in the agent's tool list (tags its event records).
    pub index: u16,
    /// Its name.
    pub name: String,
    /// The text of the report being made.
    pub out: Mutex<String>,
    /// The matches it could not attach at, and why.
    pub not_attached: Mutex<Vec<NotAttached>>,
}

/// A match a tool could not attach at.
#[derive(Debug, Clone)]
pub struct NotAttached {
    /// The -p spec, as given.
    pub spec: String,
    /// The function (or address, with its offset) and the module's file name.
    pub function: String,
    pub module: String,
    /// Why, in the tool's words (usually libprobert's message).
    pub reason: String,
}

/// The function and module file names of a match, as reports show them.
///
/// # Safety
/// `m`'s strings are NULL or NUL-terminated (the host's matches are).
pub unsafe fn match_names(m: &ToolMatch) -> (String, String, String) {
    let cs = |p: *const c_char| {
        if p.is_null() {
            String::new()
        } else {
            // SAFETY: NUL-terminated (the caller's contract).
            unsafe { CStr::from_ptr(p) }.to_string_lossy().into_owned()
        }
    };
    let module = cs(m.module).rsplit('/').next().unwrap_or("").to_owned();
    let function = if m.symbol.is_null() {
        format!("{:#x}", m.addr)
    } else if m.func_start != 0 && m.addr != m.func_start {
        format!("{}+{:#x}", cs(m.symbol), m.addr - m.func_start)
    } else {
        cs(m.symbol)
    };
    (function, module, cs(m.spec))
}

thread_local! {
    /// The message of this thread's last failed libprobert call through
    /// the host table (normal context only: never read by handlers).
    static LAST_ERROR: std::cell::RefCell<std::ffi::CString> =
        std::cell::RefCell::new(std::ffi::CString::default());
}

fn set_last_error(e: &probert::Error) {
    let msg = std::ffi::CString::new(e.to_string().replace('\0', " ")).unwrap_or_default();
    let _ = LAST_ERROR.try_with(|l| *l.borrow_mut() = msg);
}

extern "C" fn last_error() -> *const c_char {
    // The pointer stays valid until this thread's next failing call
    // replaces the string (as the header says).
    LAST_ERROR
        .try_with(|l| l.borrow().as_ptr())
        .unwrap_or(c"".as_ptr())
}

unsafe extern "C" fn not_attached(ctx: *mut ToolCtx, m: *const ToolMatch, reason: *const c_char) {
    // SAFETY: the tool's own context and a match the host gave it.
    let (Some(ctx), Some(m)) = (unsafe { ctx.as_ref() }, unsafe { m.as_ref() }) else {
        return;
    };
    // SAFETY: the host's match.
    let (function, module, spec) = unsafe { match_names(m) };
    let reason = if reason.is_null() {
        "unknown reason".into()
    } else {
        // SAFETY: NUL-terminated (the caller's contract).
        unsafe { CStr::from_ptr(reason) }
            .to_string_lossy()
            .into_owned()
    };
    ctx.not_attached
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .push(NotAttached {
            spec,
            function,
            module,
            reason,
        });
}

unsafe extern "C" fn shared_counter(
    ctx: *mut ToolCtx,
    m: *const ToolMatch,
    what: *const c_char,
) -> *mut u64 {
    // SAFETY: the tool's own context and a match the host gave it.
    let (Some(ctx), Some(m), false) = (
        unsafe { ctx.as_ref() },
        unsafe { m.as_ref() },
        what.is_null(),
    ) else {
        return std::ptr::null_mut();
    };
    // SAFETY: the host's match; `what` is NUL-terminated.
    let ((function, module, _), what) =
        unsafe { (match_names(m), CStr::from_ptr(what).to_string_lossy()) };
    crate::shared::counter(&ctx.name, &function, &module, &what)
        .map_or(std::ptr::null_mut(), |c| c.as_ptr())
}

/// The status numbers of probert.h that the wrappers return.
const OK: u32 = 0;
const INVALID: u32 = 1;

fn status(e: &probert::Error) -> u32 {
    e.status_code()
}

/// Reads `probert_attach_opts` of the size the caller gives.
///
/// # Safety
/// `opts` is NULL or points at `opts.size` readable bytes.
unsafe fn read_opts(opts: *const AttachOpts) -> Option<AttachOptions> {
    if opts.is_null() {
        return Some(AttachOptions::default());
    }
    // SAFETY: the caller's `size` field comes first and is always present.
    let size = unsafe { (*opts).size };
    let mut o = AttachOpts {
        size,
        mode: 0,
        on_return: None,
    };
    let n = size.min(std::mem::size_of::<AttachOpts>());
    if n < 12 {
        return None;
    }
    // SAFETY: `n` bytes are readable (the caller's size) and fit `o`.
    unsafe {
        std::ptr::copy_nonoverlapping(opts.cast::<u8>(), std::ptr::addr_of_mut!(o).cast::<u8>(), n)
    };
    Some(AttachOptions {
        mode: Mode::from_raw(o.mode)?,
        on_return: o.on_return,
    })
}

unsafe extern "C" fn attach_ex(
    addr: *const c_void,
    handler: Option<Handler>,
    user_data: *mut c_void,
    opts: *const AttachOpts,
    out: *mut u64,
) -> u32 {
    let (Some(handler), false, false) = (handler, addr.is_null(), out.is_null()) else {
        return INVALID;
    };
    // SAFETY: the caller's contract (probert.h).
    let Some(o) = (unsafe { read_opts(opts) }) else {
        return INVALID;
    };
    // SAFETY: the tool vouches for the address and the handler (probert.h).
    match unsafe { probert::attach_with(addr as usize, handler, user_data, o) } {
        Ok(id) => {
            // SAFETY: not NULL; the caller's out-parameter.
            unsafe { out.write(id.0) };
            OK
        }
        Err(e) => {
            set_last_error(&e);
            status(&e)
        }
    }
}

unsafe extern "C" fn attach_batch_ex(
    reqs: *const CAttachReq,
    n: usize,
    opts: *const AttachOpts,
    out: *mut u64,
    err_index: *mut usize,
) -> u32 {
    if reqs.is_null() || out.is_null() || n == 0 {
        return INVALID;
    }
    // SAFETY: the caller's contract.
    let Some(o) = (unsafe { read_opts(opts) }) else {
        return INVALID;
    };
    // SAFETY: `n` requests, as the caller says.
    let reqs = unsafe { std::slice::from_raw_parts(reqs, n) };
    let mut rs = Vec::with_capacity(n);
    for (i, r) in reqs.iter().enumerate() {
        let Some(handler) = r.handler.filter(|_| !r.addr.is_null()) else {
            if !err_index.is_null() {
                // SAFETY: not NULL.
                unsafe { err_index.write(i) };
            }
            return INVALID;
        };
        rs.push(AttachReq {
            addr: r.addr as usize,
            handler,
            user_data: r.user_data,
        });
    }
    let reqs = &rs[..];
    match probert::attach_batch_with(reqs, o) {
        Ok(ids) => {
            for (i, id) in ids.iter().enumerate() {
                // SAFETY: `n` handles fit `out`, as the caller says.
                unsafe { out.add(i).write(id.0) };
            }
            OK
        }
        Err((i, e)) => {
            set_last_error(&e);
            if !err_index.is_null() {
                // SAFETY: not NULL.
                unsafe { err_index.write(i) };
            }
            status(&e)
        }
    }
}

extern "C" fn detach(c: u64) -> u32 {
    match probert::detach(ConsumerId(c)) {
        Ok(()) => OK,
        Err(e) => {
            set_last_error(&e);
            status(&e)
        }
    }
}

unsafe extern "C" fn consumer_get_stats(c: u64, out: *mut ConsumerStats) -> u32 {
    if out.is_null() {
        return INVALID;
    }
    match probert::stats(ConsumerId(c)) {
        Ok(s) => {
            // SAFETY: not NULL.
            unsafe {
                out.write(ConsumerStats {
                    hits: s.hits,
                    missed: s.missed,
                    returns: s.returns,
                    abandoned: s.abandoned,
                })
            };
            OK
        }
        Err(e) => status(&e),
    }
}

unsafe extern "C" fn symbol_addr(
    module: *const c_char,
    symbol: *const c_char,
    out: *mut *const c_void,
) -> u32 {
    if symbol.is_null() || out.is_null() {
        return INVALID;
    }
    // SAFETY: NUL-terminated strings (the caller's contract).
    let symbol = unsafe { CStr::from_ptr(symbol) }.to_string_lossy();
    let module = (!module.is_null())
        // SAFETY: as above.
        .then(|| unsafe { CStr::from_ptr(module) }.to_string_lossy());
    match probert::symbol_addr(module.as_deref(), &symbol) {
        Ok(a) => {
            // SAFETY: not NULL.
            unsafe { out.write(a as *const c_void) };
            OK
        }
        Err(e) => status(&e),
    }
}

/// # Signal safety
/// Reads a register: no allocation, lock or panic.
unsafe extern "C" fn regs_get(regs: *const Regs, reg: u32) -> u64 {
    // SAFETY: NULL or the live registers of the hit (the handler's contract).
    match (unsafe { regs.as_ref() }, Reg::from_index(reg)) {
        (Some(r), Some(reg)) => r.get(reg),
        _ => 0,
    }
}

/// # Signal safety
/// Reads a register: no allocation, lock or panic.
unsafe extern "C" fn regs_arg(regs: *const Regs, n: u32) -> u64 {
    // SAFETY: NULL or the live registers of the hit (the handler's contract).
    match unsafe { regs.as_ref() } {
        Some(r) => r.arg(n as usize).unwrap_or(0),
        None => 0,
    }
}

/// # Signal safety
/// Writes into the calling thread's buffer ([`events::emit`]).
unsafe extern "C" fn emit(ctx: *mut ToolCtx, rec: *const c_void, len: usize) -> c_int {
    // SAFETY: the tool's own context, live for the process.
    let Some(ctx) = (unsafe { ctx.as_ref() }) else {
        return -1;
    };
    if rec.is_null() || len > events::MAX_RECORD {
        events::count_drop();
        return -1;
    }
    // SAFETY: `len` readable bytes (the caller's contract).
    let bytes = unsafe { std::slice::from_raw_parts(rec.cast::<u8>(), len) };
    events::emit(ctx.index, bytes)
}

/// # Signal safety
/// `clock_gettime` is async-signal-safe.
pub extern "C" fn now_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: a valid out-pointer.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    (ts.tv_sec as u64)
        .wrapping_mul(1_000_000_000)
        .wrapping_add(ts.tv_nsec as u64)
}

/// # Signal safety
/// [`crate::agent_thread`]: atomic loads.
extern "C" fn is_agent_thread() -> c_int {
    c_int::from(crate::agent_thread())
}

/// Where the agent's own code is (its executable segments), set at start.
static AGENT_CODE: [AtomicUsize; 2] = [AtomicUsize::new(0), AtomicUsize::new(0)];

/// Finds the agent's executable segment (the one holding this function):
/// normal context, at start, before any probe exists.
pub fn find_agent_code() {
    unsafe extern "C" fn each(
        info: *mut libc::dl_phdr_info,
        _size: usize,
        data: *mut c_void,
    ) -> c_int {
        // SAFETY: the loader's description of one module, valid during the
        // callback; `data` is the (here, start, end) triple below.
        let (info, found) = unsafe { (&*info, &mut *data.cast::<(usize, usize, usize)>()) };
        for i in 0..usize::from(info.dlpi_phnum) {
            // SAFETY: `dlpi_phnum` program headers at `dlpi_phdr`.
            let ph = unsafe { &*info.dlpi_phdr.add(i) };
            if ph.p_type != libc::PT_LOAD || ph.p_flags & libc::PF_X == 0 {
                continue;
            }
            let start = (info.dlpi_addr as usize).wrapping_add(ph.p_vaddr as usize);
            let end = start.wrapping_add(ph.p_memsz as usize);
            if (start..end).contains(&found.0) {
                (found.1, found.2) = (start, end);
                return 1;
            }
        }
        0
    }
    let mut found = (find_agent_code as *const () as usize, 0usize, 0usize);
    // SAFETY: a callback of the right type; `found` outlives the call.
    unsafe {
        libc::dl_iterate_phdr(
            Some(each),
            (&mut found as *mut (usize, usize, usize)).cast(),
        )
    };
    // Ordering: Relaxed — set before any probe exists (attaching orders it).
    AGENT_CODE[0].store(found.1, Ordering::Relaxed);
    AGENT_CODE[1].store(found.2, Ordering::Relaxed);
}

/// For a hit at a function's entry: 1 if the function was called from the
/// agent's own code (an allocation of its runtime at a thread's exit, say)
/// or on a thread of the agent's.
///
/// # Signal safety
/// Atomic loads and one load from the stack the hit's registers name.
pub(crate) unsafe extern "C" fn is_agent_call(regs: *const Regs) -> c_int {
    if crate::agent_thread() {
        return 1;
    }
    // SAFETY: the handler's registers, or NULL.
    let Some(regs) = (unsafe { regs.as_ref() }) else {
        return 0;
    };
    // Ordering: Relaxed — see find_agent_code.
    let (start, end) = (
        AGENT_CODE[0].load(Ordering::Relaxed),
        AGENT_CODE[1].load(Ordering::Relaxed),
    );
    // SAFETY: at a function's entry the stack pointer points at the return
    // address its call pushed: mapped, the thread's own stack.
    let ret = unsafe { std::ptr::read_volatile(regs.sp() as *const usize) };
    c_int::from((start..end).contains(&ret))
}

unsafe extern "C" fn print(ctx: *mut ToolCtx, text: *const c_char) {
    // SAFETY: the tool's own context; a NUL-terminated string.
    if let (Some(ctx), false) = (unsafe { ctx.as_ref() }, text.is_null()) {
        // SAFETY: as above.
        let text = unsafe { CStr::from_ptr(text) }.to_string_lossy();
        ctx.out
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push_str(&text);
    }
}

unsafe extern "C" fn write_file(
    _ctx: *mut ToolCtx,
    path: *const c_char,
    data: *const c_void,
    len: usize,
) -> c_int {
    if path.is_null() || (data.is_null() && len > 0) {
        return -1;
    }
    // SAFETY: a NUL-terminated string.
    let path = unsafe { CStr::from_ptr(path) }
        .to_string_lossy()
        .into_owned();
    let path = match std::env::var_os("PROBERT_CWD") {
        Some(dir) if !path.starts_with('/') => std::path::Path::new(&dir).join(path),
        _ => path.into(),
    };
    let bytes = if len == 0 {
        &[][..]
    } else {
        // SAFETY: `len` readable bytes.
        unsafe { std::slice::from_raw_parts(data.cast::<u8>(), len) }
    };
    match std::fs::write(path, bytes) {
        Ok(()) => 0,
        Err(_) => -1,
    }
}

/// The host table given to every tool.
pub fn host(json: bool) -> ToolHost {
    ToolHost {
        size: std::mem::size_of::<ToolHost>(),
        abi: ABI,
        json: u32::from(json),
        attach_ex,
        attach_batch_ex,
        detach,
        consumer_get_stats,
        symbol_addr,
        regs_get,
        regs_arg,
        emit,
        now_ns,
        is_agent_thread,
        print,
        write_file,
        last_error,
        not_attached,
        shared_counter,
        is_agent_call,
    }
}
