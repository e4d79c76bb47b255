//! A preloaded library for gVisor releases before 2024 (see
//! `runsc::STATX_FIXED_SINCE`), which refuse `statx` and `fstatat` with
//! `AT_NO_AUTOMOUNT` (EINVAL): Debian 12's coreutils pass it, so `ls -l`
//! and `stat` fail on every file. This `statx` drops the flag (gVisor has
//! no automounts for it to matter) and makes the system call itself. The
//! guest helper preloads it where the gVisor tier puts it; it needs nothing
//! from the guest's C library but `__errno_location`. x86_64 only.
#![no_std]

use core::arch::asm;

#[panic_handler]
fn panic(_: &core::panic::PanicInfo) -> ! {
    loop {}
}

extern "C" {
    fn __errno_location() -> *mut i32;
}

const SYS_STATX: isize = 332;
const AT_NO_AUTOMOUNT: i32 = 0x800;

/// # Safety
/// The same contract as the C library's `statx`.
#[no_mangle]
pub unsafe extern "C" fn statx(dirfd: i32, path: *const u8, flags: i32, mask: u32, buf: *mut u8) -> i32 {
    let r: isize;
    // SAFETY: the statx system call, with the caller's arguments.
    unsafe {
        asm!("syscall",
            inlateout("rax") SYS_STATX => r,
            in("rdi") dirfd as isize,
            in("rsi") path,
            in("rdx") (flags & !AT_NO_AUTOMOUNT) as isize,
            in("r10") mask as isize,
            in("r8") buf,
            lateout("rcx") _, lateout("r11") _,
            options(nostack));
    }
    if r < 0 {
        // SAFETY: the C library's thread-local errno.
        unsafe { *__errno_location() = -r as i32 };
        return -1;
    }
    r as i32
}
