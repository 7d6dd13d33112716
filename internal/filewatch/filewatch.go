// Package filewatch calls back when a file's contents change, however the
// change is made: written in place, or replaced by a rename as editors,
// config managers and Kubernetes ConfigMap volumes do. A watch on the file
// itself would follow the old inode away on the first rename, so the
// watcher watches the file's directory and re-reads the file by name.
package filewatch

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"time"

	"github.com/fsnotify/fsnotify"
	"github.com/hashicorp/go-hclog"
)

// DefaultDebounce is the quiet time after the last event before the file
// is read: long enough to let an editor finish its write-rename-chmod
// sequence, short enough that an edit takes effect well within a second.
const DefaultDebounce = 100 * time.Millisecond

// maxDelayFactor caps, in debounce periods, how long a stream of events
// can put off reading the file.
const maxDelayFactor = 10

// Watcher watches one file. Set its fields, then call Run.
type Watcher struct {
	Path string
	// Loaded is the content the caller has already acted on; only a
	// different content is a change. When nil, the content at Run's start
	// is taken as loaded.
	Loaded []byte
	// Debounce is the quiet time before a read; 0 means DefaultDebounce.
	Debounce time.Duration
	Log      hclog.Logger
}

// Run calls onChange with the file's new contents after each change, until
// ctx ends. A missing, unreadable or empty file is skipped (and logged): the
// caller keeps what it loaded last. An in-place write can still be seen
// half done; replacing the file by rename is atomic. Run fails only if the directory cannot be
// watched.
func (w *Watcher) Run(ctx context.Context, onChange func(data []byte)) error {
	fw, err := fsnotify.NewWatcher()
	if err != nil {
		return fmt.Errorf("watch %s: %w", w.Path, err)
	}
	defer fw.Close()
	if err := fw.Add(filepath.Dir(w.Path)); err != nil {
		return fmt.Errorf("watch %s: %w", w.Path, err)
	}
	return w.loop(ctx, fw.Events, fw.Errors, onChange)
}

// loop turns events into debounced reads. It is Run without fsnotify, so
// that tests can drive it with made-up events under testing/synctest.
func (w *Watcher) loop(ctx context.Context, events <-chan fsnotify.Event, errs <-chan error, onChange func([]byte)) error {
	log := w.Log
	if log == nil {
		log = hclog.NewNullLogger()
	}
	debounce := w.Debounce
	if debounce <= 0 {
		debounce = DefaultDebounce
	}
	name := filepath.Base(w.Path)
	// Through a symlink (a ConfigMap's ..data swap), the event names the
	// link's target directory, not the file: any event in the directory
	// counts.
	fi, err := os.Lstat(w.Path)
	anyName := err == nil && fi.Mode()&fs.ModeSymlink != 0

	loaded, missing := w.Loaded, false
	check := func() {
		data, err := os.ReadFile(w.Path)
		switch {
		case errors.Is(err, fs.ErrNotExist):
			if !missing {
				log.Warn("watched file is gone; keeping what was loaded from it", "path", w.Path)
			}
			missing = true
			return
		case err != nil:
			log.Warn("cannot read watched file; keeping what was loaded from it", "path", w.Path, "error", err)
			return
		}
		missing = false
		if len(data) == 0 {
			// Most likely caught between an in-place truncate and the
			// write that follows; that write brings another event.
			log.Debug("watched file is empty; waiting for content", "path", w.Path)
			return
		}
		if loaded != nil && bytes.Equal(data, loaded) {
			return // a chmod, a touch, or an edit undone
		}
		loaded = data
		onChange(data)
	}
	if loaded == nil {
		loaded, _ = os.ReadFile(w.Path)
	} else {
		// An edit made between the caller's read and the watch is seen now.
		check()
	}

	var timer *time.Timer
	var fire <-chan time.Time
	var first time.Time
	defer func() {
		if timer != nil {
			timer.Stop()
		}
	}()
	schedule := func() {
		switch {
		case fire == nil:
			first = time.Now()
			if timer == nil {
				timer = time.NewTimer(debounce)
			} else {
				timer.Reset(debounce)
			}
			fire = timer.C
		case time.Since(first) < maxDelayFactor*debounce:
			timer.Reset(debounce)
		}
	}
	for {
		select {
		case <-ctx.Done():
			return nil
		case ev, ok := <-events:
			if !ok {
				return nil
			}
			if anyName || filepath.Base(ev.Name) == name {
				schedule()
			}
		case err, ok := <-errs:
			if !ok {
				return nil
			}
			// Most likely an event queue overflow: an event for the file
			// may have been lost, so look at it.
			log.Warn("file watch error", "path", w.Path, "error", err)
			schedule()
		case <-fire:
			fire = nil
			check()
		}
	}
}
