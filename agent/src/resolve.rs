//! Specs to addresses: `[MODULE:]SYMBOL-GLOB[+OFFSET]` or an address,
//! matched against the functions of the loaded modules.
#![allow(unsafe_code)]

use std::collections::HashSet;
use std::ffi::{CStr, CString};

/// One parsed spec.
#[derive(Debug, Clone)]
pub struct Spec {
    pub text: String,
    pub module: Option<String>,
    pub symbol: String,
    pub offset: usize,
    pub addr: Option<usize>,
}

fn parse_num(s: &str) -> Option<usize> {
    match s.strip_prefix("0x").or_else(|| s.strip_prefix("0X")) {
        Some(h) => usize::from_str_radix(h, 16).ok(),
        None => s.parse().ok(),
    }
}

impl Spec {
    pub fn parse(text: &str) -> Result<Spec, String> {
        if let Some(a) = text
            .strip_prefix("0x")
            .and_then(|h| usize::from_str_radix(h, 16).ok())
        {
            return Ok(Spec {
                text: text.into(),
                module: None,
                symbol: String::new(),
                offset: 0,
                addr: Some(a),
            });
        }
        let (module, rest) = match text.split_once(':') {
            Some((m, r)) => (Some(m.to_owned()), r),
            None => (None, text),
        };
        let (symbol, offset) = match rest.rsplit_once('+') {
            Some((s, o)) => (
                s,
                parse_num(o).ok_or(format!("bad offset in spec '{text}'"))?,
            ),
            None => (rest, 0),
        };
        if symbol.is_empty() || module.as_deref() == Some("") {
            return Err(format!(
                "bad spec '{text}': expected [MODULE:]SYMBOL-GLOB[+OFFSET]"
            ));
        }
        Ok(Spec {
            text: text.into(),
            module,
            symbol: symbol.into(),
            offset,
            addr: None,
        })
    }
}

/// Shell-style glob: `*`, `?`, `[...]`.
pub fn glob(pat: &[u8], s: &[u8]) -> bool {
    let (mut p, mut i) = (0, 0);
    let (mut star, mut mark) = (None, 0);
    while i < s.len() {
        if p < pat.len() && pat[p] == b'*' {
            star = Some(p);
            mark = i;
            p += 1;
            continue;
        }
        if p < pat.len() {
            if pat[p] == b'[' {
                if let Some(close) = pat[p + 1..].iter().position(|&c| c == b']') {
                    let set = &pat[p + 1..p + 1 + close];
                    let (neg, set) = match set.first() {
                        Some(b'!') | Some(b'^') => (true, &set[1..]),
                        _ => (false, set),
                    };
                    let mut hit = false;
                    let mut k = 0;
                    while k < set.len() {
                        if k + 2 < set.len() && set[k + 1] == b'-' {
                            hit |= set[k] <= s[i] && s[i] <= set[k + 2];
                            k += 3;
                        } else {
                            hit |= set[k] == s[i];
                            k += 1;
                        }
                    }
                    if hit != neg {
                        p += close + 2;
                        i += 1;
                        continue;
                    }
                }
            } else if pat[p] == b'?' || pat[p] == s[i] {
                p += 1;
                i += 1;
                continue;
            }
        }
        match star {
            Some(sp) => {
                p = sp + 1;
                mark += 1;
                i = mark;
            }
            None => return false,
        }
    }
    pat[p..].iter().all(|&c| c == b'*')
}

/// A loaded module.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Module {
    pub path: String,
    pub base: usize,
}

impl Module {
    pub fn file_name(&self) -> &str {
        self.path.rsplit('/').next().unwrap_or(&self.path)
    }
}

/// Whether module glob `m` names `module`: its path, its file name, or its
/// file name without the `.so…` suffix (`libc` for `libc.so.6`).
pub fn module_matches(m: &str, module: &Module) -> bool {
    let name = module.file_name();
    let stem = name.find(".so").map_or(name, |i| &name[..i]);
    m == module.path
        || glob(m.as_bytes(), name.as_bytes())
        || glob(m.as_bytes(), stem.as_bytes())
        || (!m.contains(".so") && name.starts_with(&format!("{m}.so")))
}

/// The loaded modules, the main program first, without the agent itself,
/// the vDSO and probert's tools.
pub fn loaded_modules() -> Vec<Module> {
    unsafe extern "C" fn cb(
        info: *mut libc::dl_phdr_info,
        _: usize,
        data: *mut libc::c_void,
    ) -> i32 {
        // SAFETY: the loader's info for this call; `data` is our Vec.
        let (info, out) = unsafe { (&*info, &mut *data.cast::<Vec<(String, usize)>>()) };
        let name = if info.dlpi_name.is_null() {
            String::new()
        } else {
            // SAFETY: a NUL-terminated path.
            unsafe { CStr::from_ptr(info.dlpi_name) }
                .to_string_lossy()
                .into_owned()
        };
        out.push((name, info.dlpi_addr as usize));
        0
    }
    let mut raw: Vec<(String, usize)> = Vec::new();
    // SAFETY: the callback matches dl_iterate_phdr's contract.
    unsafe { libc::dl_iterate_phdr(Some(cb), std::ptr::addr_of_mut!(raw).cast()) };
    let me = agent_path();
    let exe = std::fs::read_link("/proc/self/exe")
        .map(|p| p.to_string_lossy().into_owned())
        .unwrap_or_default();
    let mut out = Vec::new();
    for (i, (name, base)) in raw.into_iter().enumerate() {
        let path = if i == 0 && name.is_empty() {
            exe.clone()
        } else {
            name
        };
        if path.is_empty() || path.contains("linux-vdso") || Some(&path) == me.as_ref() {
            continue;
        }
        if crate::is_tool_path(&path) {
            continue;
        }
        out.push(Module { path, base });
    }
    out
}

/// The agent's own file.
pub fn agent_path() -> Option<String> {
    let mut info: libc::Dl_info = unsafe_zeroed();
    // SAFETY: an address inside this library; `info` is a valid out-pointer.
    let ok = unsafe { libc::dladdr(agent_path as *const libc::c_void, &mut info) };
    if ok == 0 || info.dli_fname.is_null() {
        return None;
    }
    // SAFETY: a NUL-terminated path.
    Some(
        unsafe { CStr::from_ptr(info.dli_fname) }
            .to_string_lossy()
            .into_owned(),
    )
}

fn unsafe_zeroed() -> libc::Dl_info {
    libc::Dl_info {
        dli_fname: std::ptr::null(),
        dli_fbase: std::ptr::null_mut(),
        dli_sname: std::ptr::null(),
        dli_saddr: std::ptr::null_mut(),
    }
}

/// One resolved match.
#[derive(Debug, Clone)]
pub struct Match {
    pub spec_index: u32,
    pub module: CString,
    pub symbol: Option<CString>,
    pub addr: usize,
    pub func_start: usize,
    pub func_end: usize,
    pub module_base: usize,
}

/// Matches `specs` in `modules`; `seen` holds addresses already matched.
/// Returns the matches and, per spec, whether a module it names is loaded.
pub fn resolve(
    specs: &[Spec],
    modules: &[Module],
    seen: &mut HashSet<usize>,
) -> (Vec<Match>, Vec<bool>) {
    let mut out = Vec::new();
    let mut module_seen = vec![false; specs.len()];
    let mut funcs_cache: Vec<Option<Vec<probert::Function>>> = vec![None; modules.len()];
    for (si, spec) in specs.iter().enumerate() {
        if let Some(a) = spec.addr {
            module_seen[si] = true;
            if seen.insert(a) {
                let m = modules.iter().rev().find(|m| m.base <= a);
                out.push(Match {
                    spec_index: si as u32,
                    module: CString::new(m.map_or("", |m| m.path.as_str())).unwrap_or_default(),
                    symbol: None,
                    addr: a,
                    func_start: 0,
                    func_end: 0,
                    module_base: m.map_or(0, |m| m.base),
                });
            }
            continue;
        }
        let has_glob = spec.symbol.contains(['*', '?', '[']);
        for (mi, m) in modules.iter().enumerate() {
            if let Some(mg) = &spec.module {
                if !module_matches(mg, m) {
                    continue;
                }
            }
            module_seen[si] = true;
            let funcs = funcs_cache[mi]
                .get_or_insert_with(|| probert::functions(&m.path).unwrap_or_default());
            for f in funcs.iter() {
                let Some(name) = f.name.as_deref() else {
                    continue;
                };
                let hit = if has_glob {
                    glob(spec.symbol.as_bytes(), name.as_bytes())
                } else {
                    name == spec.symbol
                };
                if !hit {
                    continue;
                }
                // An IFUNC's symbol names its resolver: probe what dlsym
                // gives instead, when that lies in the same module.
                let mut start = f.start;
                let mut end = f.end;
                if let Ok(a) = probert::symbol_addr(Some(&m.path), name) {
                    if a != f.start {
                        if let Some(g) = funcs.iter().find(|g| g.start <= a && a < g.end) {
                            start = a;
                            end = g.end;
                        }
                    }
                }
                let addr = start + spec.offset;
                if addr >= end.max(start + 1) || !seen.insert(addr) {
                    continue;
                }
                out.push(Match {
                    spec_index: si as u32,
                    module: CString::new(m.path.as_str()).unwrap_or_default(),
                    symbol: CString::new(name).ok(),
                    addr,
                    func_start: start,
                    func_end: end,
                    module_base: m.base,
                });
            }
        }
    }
    (out, module_seen)
}

fn distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut prev: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut cur = vec![i + 1];
        for (j, &cb) in b.iter().enumerate() {
            let sub = prev[j] + usize::from(ca != cb);
            cur.push(sub.min(prev[j + 1] + 1).min(cur[j] + 1));
        }
        prev = cur;
    }
    prev[b.len()]
}

/// The names closest to `spec` in the modules it could match.
pub fn closest(spec: &Spec, modules: &[Module]) -> Vec<String> {
    let want: String = spec
        .symbol
        .chars()
        .filter(|c| !"*?[]".contains(*c))
        .collect();
    let mut all: Vec<(usize, String)> = Vec::new();
    for m in modules {
        if let Some(mg) = &spec.module {
            if !module_matches(mg, m) {
                continue;
            }
        }
        for f in probert::functions(&m.path).unwrap_or_default() {
            if let Some(n) = f.name {
                let d = if n.contains(&want) && !want.is_empty() {
                    n.len() - want.len()
                } else {
                    distance(&want, &n)
                };
                all.push((d, format!("{} ({})", n, m.file_name())));
            }
        }
    }
    all.sort();
    all.dedup_by(|a, b| a.1 == b.1);
    all.into_iter().take(5).map(|(_, n)| n).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn globs() {
        assert!(glob(b"str*", b"strlen"));
        assert!(!glob(b"str*", b"memcpy"));
        assert!(glob(b"sqlite3_*", b"sqlite3_step"));
        assert!(glob(b"a?c", b"abc"));
        assert!(glob(b"[a-c]x", b"bx"));
        assert!(!glob(b"[!a-c]x", b"bx"));
        assert!(glob(b"*", b""));
        assert!(!glob(b"malloc", b"mallocx"));
    }

    #[test]
    fn specs_and_modules() {
        let s = Spec::parse("libc.so.6:str*+0x4").unwrap();
        assert_eq!(s.module.as_deref(), Some("libc.so.6"));
        assert_eq!((s.symbol.as_str(), s.offset), ("str*", 4));
        assert_eq!(Spec::parse("0x1000").unwrap().addr, Some(0x1000));
        assert!(Spec::parse(":x").is_err());
        let m = Module {
            path: "/lib/x86_64-linux-gnu/libc.so.6".into(),
            base: 0,
        };
        assert!(module_matches("libc", &m));
        assert!(module_matches("libc.so.6", &m));
        assert!(module_matches("libc.so*", &m));
        assert!(!module_matches("libz", &m));
        assert_eq!(distance("mallok", "malloc"), 1);
    }
}
