//! Probe targets with exact first instructions, written in assembly so the
//! compiler cannot change them. Each is a SysV function of `rdi`.
#![allow(dead_code)]

use std::arch::global_asm;

global_asm!(
    r#"
    .pushsection .data
    .p2align 3
    .globl t_data
t_data: .quad 1000
    .globl t_counter
t_counter: .quad 0
    .globl t_lean_hits
t_lean_hits: .quad 0
    .popsection

    .text
    .macro FUNC name
    .p2align 4
    .globl \name
    .type \name,@function
\name:
    .endm
    .macro END name
    .size \name, .-\name
    .endm

    FUNC t_push_rbp          // push rbp; … → rdi + 1
    push rbp
    mov rbp, rsp
    lea rax, [rdi + 1]
    pop rbp
    ret
    END t_push_rbp

    FUNC t_endbr             // endbr64 → rdi + 2
    endbr64
    lea rax, [rdi + 2]
    ret
    END t_endbr

    FUNC t_riprel_mov        // mov rax, [rip + t_data] → rdi + 1000
    mov rax, qword ptr [rip + t_data]
    add rax, rdi
    ret
    END t_riprel_mov

    FUNC t_riprel_cmp        // cmp rdi, [rip + t_data] → rdi >= 1000
    cmp rdi, qword ptr [rip + t_data]
    jae 1f
    xor eax, eax
    ret
1:  mov eax, 1
    ret
    END t_riprel_cmp

    FUNC t_ret_addr          // → its own return address
    mov rax, qword ptr [rsp]
    ret
    END t_ret_addr

    FUNC t_call              // call rel32 t_ret_addr → t_call + 5
    call t_ret_addr
    ret
    END t_call

    FUNC t_jmp               // jmp rel32 over ud2 → rdi + 3
    .byte 0xe9
    .long 2f - 1f
1:  ud2
    ud2
2:  lea rax, [rdi + 3]
    ret
    END t_jmp

    FUNC t_jcc               // test; jz rel32 (at +3) → 2 if rdi == 0 else 1
    test rdi, rdi
    .byte 0x0f, 0x84
    .long 2f - 1f
1:  mov eax, 1
    ret
2:  mov eax, 2
    ret
    END t_jcc

    FUNC t_jcc8              // test; jz rel8 (at +3) → 2 if rdi == 0 else 1
    test rdi, rdi
    .byte 0x74
    .byte 2f - 1f
1:  mov eax, 1
    ret
2:  mov eax, 2
    ret
    END t_jcc8

    // Trap-only sites: a branch lands right after the probed instruction,
    // so no jump may displace it with the next one and the trap path
    // emulates it (the `jmp`s back are never taken).
    FUNC t_push_emul         // push rbp; … → rdi + 1
    push rbp
1:  mov rbp, rsp
    lea rax, [rdi + 1]
    pop rbp
    ret
    jmp 1b
    END t_push_emul

    FUNC t_jcc8_emul         // test; jz rel8 (at +3) → 2 if rdi == 0 else 1
    test rdi, rdi
    .byte 0x74
    .byte 2f - 1f
1:  mov eax, 1
    ret
2:  mov eax, 2
    ret
    jmp 1b
    END t_jcc8_emul

    FUNC t_call_reg_emul     // call rax (at +7) → t_ret_addr's return address
    lea rax, [rip + t_ret_addr]
    call rax
1:  ret
    jmp 1b
    END t_call_reg_emul

    FUNC t_sub_rsp           // sub rsp, 24; … → rdi + 5
    sub rsp, 24
    mov qword ptr [rsp + 8], rdi
    mov rax, qword ptr [rsp + 8]
    add rax, 5
    add rsp, 24
    ret
    END t_sub_rsp

    FUNC t_rsp_read          // mov rax, [rsp] → its return address
    mov rax, qword ptr [rsp]
    ret
    END t_rsp_read

    FUNC t_lock              // lock inc [rip + t_counter] → rdi
    lock inc qword ptr [rip + t_counter]
    mov rax, rdi
    ret
    END t_lock

    FUNC t_foreign           // a foreign int3 → rdi + 7
    int3
    lea rax, [rdi + 7]
    ret
    END t_foreign

    // Live values in every GPR, xmm0-15 and CF across a NOP site; writes
    // what survived to the array at rdi: gpr[16] (rsp slot: rsp delta),
    // xmm[16] (low quadwords), then RFLAGS.
    FUNC t_clobber
    push rbx
    push rbp
    push r12
    push r13
    push r14
    push r15
    push rdi
    mov rax, 0x100
    movq xmm0, rax
    mov rax, 0x101
    movq xmm1, rax
    mov rax, 0x102
    movq xmm2, rax
    mov rax, 0x103
    movq xmm3, rax
    mov rax, 0x104
    movq xmm4, rax
    mov rax, 0x105
    movq xmm5, rax
    mov rax, 0x106
    movq xmm6, rax
    mov rax, 0x107
    movq xmm7, rax
    mov rax, 0x108
    movq xmm8, rax
    mov rax, 0x109
    movq xmm9, rax
    mov rax, 0x10a
    movq xmm10, rax
    mov rax, 0x10b
    movq xmm11, rax
    mov rax, 0x10c
    movq xmm12, rax
    mov rax, 0x10d
    movq xmm13, rax
    mov rax, 0x10e
    movq xmm14, rax
    mov rax, 0x10f
    movq xmm15, rax
    mov eax, 0x7f
    add al, 1                // OF SF AF set, ZF PF clear
    mov rax, 0x1111
    mov rbx, 0x2222
    mov rcx, 0x3333
    mov rdx, 0x4444
    mov rsi, 0x5555
    mov rdi, 0x6666
    mov rbp, 0x7777
    mov r8, 0x8888
    mov r9, 0x9999
    mov r10, 0xaaaa
    mov r11, 0xbbbb
    mov r12, 0xcccc
    mov r13, 0xdddd
    mov r14, 0xeeee
    mov r15, rsp
    stc                      // CF set
    .globl t_clobber_site
t_clobber_site:
    .byte 0x0f, 0x1f, 0x44, 0x00, 0x00
    push rax
    mov rax, [rsp + 8]
    pushfq
    pop qword ptr [rax + 0x100]
    mov [rax + 0x08], rbx
    mov [rax + 0x10], rcx
    mov [rax + 0x18], rdx
    mov [rax + 0x20], rsi
    mov [rax + 0x28], rdi
    mov [rax + 0x30], rbp
    mov [rax + 0x40], r8
    mov [rax + 0x48], r9
    mov [rax + 0x50], r10
    mov [rax + 0x58], r11
    mov [rax + 0x60], r12
    mov [rax + 0x68], r13
    mov [rax + 0x70], r14
    lea rbx, [rsp + 8]
    sub rbx, r15
    mov [rax + 0x38], rbx
    mov [rax + 0x78], r15
    movq [rax + 0x80], xmm0
    movq [rax + 0x88], xmm1
    movq [rax + 0x90], xmm2
    movq [rax + 0x98], xmm3
    movq [rax + 0xa0], xmm4
    movq [rax + 0xa8], xmm5
    movq [rax + 0xb0], xmm6
    movq [rax + 0xb8], xmm7
    movq [rax + 0xc0], xmm8
    movq [rax + 0xc8], xmm9
    movq [rax + 0xd0], xmm10
    movq [rax + 0xd8], xmm11
    movq [rax + 0xe0], xmm12
    movq [rax + 0xe8], xmm13
    movq [rax + 0xf0], xmm14
    movq [rax + 0xf8], xmm15
    pop qword ptr [rax]
    add rsp, 8
    pop r15
    pop r14
    pop r13
    pop r12
    pop rbp
    pop rbx
    ret
    END t_clobber

    // A leaf function with live red-zone data across a NOP site mid-function
    // → rdi + 0x1234 + 0x5678.
    FUNC t_redzone
    mov qword ptr [rsp - 8], rdi
    mov qword ptr [rsp - 16], 0x1234
    mov qword ptr [rsp - 128], 0x5678
    .globl t_redzone_site
t_redzone_site:
    .byte 0x0f, 0x1f, 0x44, 0x00, 0x00
    mov rax, qword ptr [rsp - 8]
    add rax, qword ptr [rsp - 16]
    add rax, qword ptr [rsp - 128]
    ret
    END t_redzone

    // read(rdi, rsi, 1) with the `syscall` at a symbol of its own: probed,
    // it runs out of line, so a thread blocked in it sits inside a stub.
    FUNC t_read_byte
    mov edx, 1
    xor eax, eax
    .globl t_read_syscall
t_read_syscall:
    syscall
    ret
    END t_read_byte

    FUNC t_nop5              // nop5 → rdi + 9 (the JIT-style patchable site)
    .byte 0x0f, 0x1f, 0x44, 0x00, 0x00
    lea rax, [rdi + 9]
    ret
    END t_nop5

    // Handlers for the fast path's lean case: leaves that never use their
    // hit, so the trampoline saves only what a call may change. Each counts
    // its calls in t_lean_hits, then scribbles on every caller-saved GPR and
    // the flags, and on the stack far below.
    .macro LEAN_SCRIBBLE
    lock inc qword ptr [rip + t_lean_hits]
    mov rcx, -1
    mov rdx, -1
    mov rsi, -1
    mov rdi, -1
    mov r8, -1
    mov r9, -1
    mov r10, -1
    mov r11, -1
    sub rsp, 2048
    mov [rsp], rcx
    mov [rsp + 1024], rcx
    add rsp, 2048
    .endm

    FUNC t_lean_scribble     // → Continue
    LEAN_SCRIBBLE
    xor eax, eax
    ret
    END t_lean_scribble

    FUNC t_lean_remove       // → Remove
    LEAN_SCRIBBLE
    mov eax, 1
    ret
    END t_lean_remove
"#
);

extern "C" {
    pub static mut t_data: u64;
    pub static mut t_counter: u64;
    pub static t_lean_hits: std::sync::atomic::AtomicU64;
    pub fn t_lean_scribble(hit: *mut probert::Hit) -> u32;
    pub fn t_lean_remove(hit: *mut probert::Hit) -> u32;
    pub fn t_push_rbp(x: u64) -> u64;
    pub fn t_endbr(x: u64) -> u64;
    pub fn t_riprel_mov(x: u64) -> u64;
    pub fn t_riprel_cmp(x: u64) -> u64;
    pub fn t_ret_addr() -> u64;
    pub fn t_call() -> u64;
    pub fn t_jmp(x: u64) -> u64;
    pub fn t_jcc(x: u64) -> u64;
    pub fn t_jcc8(x: u64) -> u64;
    pub fn t_push_emul(x: u64) -> u64;
    pub fn t_jcc8_emul(x: u64) -> u64;
    pub fn t_call_reg_emul() -> u64;
    pub fn t_sub_rsp(x: u64) -> u64;
    pub fn t_rsp_read() -> u64;
    pub fn t_lock(x: u64) -> u64;
    pub fn t_foreign(x: u64) -> u64;
    pub fn t_nop5(x: u64) -> u64;
    pub fn t_read_byte(fd: i32, buf: *mut u8) -> i64;
    pub fn t_read_syscall();
    pub fn t_clobber(out: *mut u64);
    pub fn t_clobber_site();
    pub fn t_redzone(x: u64) -> u64;
    pub fn t_redzone_site();
}

/// The address of a target.
#[macro_export]
macro_rules! addr {
    ($f:ident) => {
        $crate::targets::$f as *const () as usize
    };
}
