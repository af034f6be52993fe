// syscall_loop: the process seccomp_bench runs inside a container, with and without the
// workspace's filter. Static (the container's rootfs holds only it), and built with no sanitizer
// or project flags (bench/CMakeLists.txt). For a cheap call (getppid: almost all of its cost is
// the kernel entry, so a filter's share shows most) and an ordinary one (fstat of an open file),
// prints "NAME NS", NS being nanoseconds per call over N calls (argv[1]); then "seccomp_mode M"
// from /proc/self/status.
#include <fcntl.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <unistd.h>
#include <cstdio>
#include <cstdlib>
#include <ctime>

static double now_ns() {
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);  // the vDSO: no system call
  return static_cast<double>(ts.tv_sec) * 1e9 + static_cast<double>(ts.tv_nsec);
}

int main(int argc, char** argv) {
  const long n = argc > 1 ? atol(argv[1]) : 1000000;
  double t0 = now_ns();
  for (long i = 0; i < n; ++i) syscall(SYS_getppid);
  printf("getppid %.1f\n", (now_ns() - t0) / static_cast<double>(n));
  const int fd = open("/syscall_loop", O_RDONLY);
  struct stat st;
  t0 = now_ns();
  for (long i = 0; i < n; ++i) fstat(fd, &st);
  printf("fstat %.1f\n", (now_ns() - t0) / static_cast<double>(n));
  // Which seccomp mode it ran in (0: none, 2: a filter), so the bench can tell the runs apart.
  FILE* status = fopen("/proc/self/status", "r");
  char line[256];
  while (status != nullptr && fgets(line, sizeof line, status) != nullptr) {
    int mode = -1;
    if (sscanf(line, "Seccomp: %d", &mode) == 1) printf("seccomp_mode %d\n", mode);
  }
  if (status != nullptr) fclose(status);
  return 0;
}
