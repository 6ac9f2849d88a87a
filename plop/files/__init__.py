"""Files and untrusted input: every write (atomic, never through a symlink) and bounded read, the
escaping and regex guards for strings from reports and configs, and the task data plop reads."""
