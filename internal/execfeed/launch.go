package execfeed

import (
	"errors"
	"fmt"
	"os"
	"os/exec"
)

// launch is where the files live and how the command starts: a stage in
// a private mount namespace, or a plain child reading a tmpfs directory.
type launch struct {
	store   *Store
	where   string                    // for the log
	start   func() (*exec.Cmd, error) // runs the command, once
	abort   func()                    // before start: ends what prepare began
	cleanup func() error              // after the command: removes the files
}

// prepare makes the files' directory and, unless cfg.Mount is off, the
// stage that holds the command in a private mount namespace; in auto
// mode a failure there falls back to the directory itself.
func prepare(cfg Config, path string) (*launch, error) {
	dir, err := memoryDir(cfg.memoryBase)
	if err != nil {
		return nil, err
	}
	if cfg.Mount != MountOff {
		st, err := startStage(command(cfg, path, dir), dir)
		if err == nil {
			store := newStore(st.dir, dir)
			return &launch{
				store: store,
				where: "private tmpfs at " + dir,
				start: func() (*exec.Cmd, error) { return st.cmd, st.release() },
				abort: st.abort,
				// The tmpfs ends with the namespace; what remains on
				// this side is the empty mount point.
				cleanup: func() error { return errors.Join(store.Close(), os.Remove(dir)) },
			}, nil
		}
		if cfg.Mount == MountRequire {
			os.Remove(dir)
			return nil, err
		}
		cfg.Log.Warn("no private mount namespace; the files go to a tmpfs directory, which a SIGKILL of exec would leave behind", "dir", dir, "error", err)
	}
	f, err := os.OpenFile(dir, os.O_RDONLY, 0)
	if err != nil {
		os.Remove(dir)
		return nil, fmt.Errorf("open the files' directory: %w", err)
	}
	store := newStore(f, dir)
	cmd := command(cfg, path, dir)
	return &launch{
		store: store,
		where: dir,
		start: func() (*exec.Cmd, error) {
			if err := cmd.Start(); err != nil {
				return nil, fmt.Errorf("start %s: %w", path, err)
			}
			return cmd, nil
		},
		abort:   func() {},
		cleanup: func() error { return errors.Join(store.Close(), os.RemoveAll(dir)) },
	}, nil
}

// command is the child as the user asked for it, with the files' paths
// in its environment.
func command(cfg Config, path, dir string) *exec.Cmd {
	cmd := &exec.Cmd{Path: path, Args: cfg.Command, Stdin: cfg.Stdin, Stdout: cfg.Stdout, Stderr: cfg.Stderr}
	if cmd.Stdin == nil {
		cmd.Stdin = os.Stdin
	}
	if cmd.Stdout == nil {
		cmd.Stdout = os.Stdout
	}
	if cmd.Stderr == nil {
		cmd.Stderr = os.Stderr
	}
	// Later entries win: the paths replace any inherited ones.
	cmd.Env = append(os.Environ(), (&Store{path: dir}).Env(len(cfg.JWTAudiences) > 0)...)
	return cmd
}
