#include <pthread.h>
#include <unistd.h>
#include <stdio.h>
#include <fcntl.h>
static void *work(void *a) { int fd = open("/tmp/st/thr-out.txt", O_WRONLY|O_CREAT|O_TRUNC, 0644); write(fd, "hi\n", 3); close(fd); return 0; }
static void *execer(void *a) { usleep(20000); char *argv[] = {"/bin/echo", "from thread", 0}; execv("/bin/echo", argv); return 0; }
int main(int argc, char **argv) {
  pthread_t t[3];
  for (int i = 0; i < 2; i++) pthread_create(&t[i], 0, work, 0);
  for (int i = 0; i < 2; i++) pthread_join(t[i], 0);
  if (argc > 1) { pthread_create(&t[2], 0, execer, 0); pause(); }
  return 0;
}
