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

    FUNC t_nop5              // nop5 → rdi + 9 (the JIT-style patchable site)
    .byte 0x0f, 0x1f, 0x44, 0x00, 0x00
    lea rax, [rdi + 9]
    ret
    END t_nop5
"#
);

extern "C" {
    pub static mut t_data: u64;
    pub static mut t_counter: u64;
    pub fn t_push_rbp(x: u64) -> u64;
    pub fn t_endbr(x: u64) -> u64;
    pub fn t_riprel_mov(x: u64) -> u64;
    pub fn t_riprel_cmp(x: u64) -> u64;
    pub fn t_ret_addr() -> u64;
    pub fn t_call() -> u64;
    pub fn t_jmp(x: u64) -> u64;
    pub fn t_jcc(x: u64) -> u64;
    pub fn t_jcc8(x: u64) -> u64;
    pub fn t_sub_rsp(x: u64) -> u64;
    pub fn t_rsp_read() -> u64;
    pub fn t_lock(x: u64) -> u64;
    pub fn t_foreign(x: u64) -> u64;
    pub fn t_nop5(x: u64) -> u64;
}

/// The address of a target.
#[macro_export]
macro_rules! addr {
    ($f:ident) => {
        $crate::targets::$f as *const () as usize
    };
}
