/* The sandbox ("pause") container of the real-cluster harness (tests/e2e/src/real_cluster):
 * it holds a pod's namespaces, reaps the zombies it inherits as PID 1, and exits on
 * SIGINT or SIGTERM. The same job as Kubernetes' build/pause/linux/pause.c, written here
 * because no image can be pulled on the build machines. Built with `cc -static`. */
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <unistd.h>

static void stop(int sig) {
  (void)sig;
  _exit(0);
}

static void reap(int sig) {
  (void)sig;
  while (waitpid(-1, NULL, WNOHANG) > 0) {
  }
}

int main(int argc, char **argv) {
  if (argc > 1 && strcmp(argv[1], "-v") == 0) {
    puts("wgmesh-pause");
    return 0;
  }
  if (getpid() != 1) {
    fprintf(stderr, "wgmesh-pause: warning: not PID 1\n");
  }
  struct sigaction term = {.sa_handler = stop};
  struct sigaction child = {.sa_handler = reap, .sa_flags = SA_NOCLDSTOP};
  if (sigaction(SIGINT, &term, NULL) < 0 || sigaction(SIGTERM, &term, NULL) < 0 ||
      sigaction(SIGCHLD, &child, NULL) < 0) {
    perror("sigaction");
    return 1;
  }
  for (;;) {
    pause();
  }
}
