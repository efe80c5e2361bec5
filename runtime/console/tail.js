// tail.js: #/tail: live events over SSE (read with fetch), filtered by
// category and type. Pause closes the stream and keeps the last position;
// resume reconnects with Last-Event-ID, so nothing in between is missed.
// The page keeps at most MAX events.
import { api, sse } from './api.js';
import { el, eventCard } from './util.js';

const MAX = 200;

export function render(main) {
  const category = el('input', { id: 'l-category', name: 'category', placeholder: 'any' });
  const type = el('input', { id: 'l-type', name: 'type', placeholder: 'any' });
  const toggle = el('button', { type: 'button', id: 'l-toggle' }, 'Pause');
  const state = el('span.muted', { id: 'l-state', 'aria-live': 'polite' }, 'connecting');
  const list = el('div', { id: 'l-events' });
  const form = el('form.bar',
    el('label', { for: 'l-category' }, 'Category', category),
    el('label', { for: 'l-type' }, 'Event type', type),
    el('button.secondary', { type: 'submit' }, 'Apply filters'), toggle, state);
  main.append(el('h1', 'Live tail'), form, el('p.muted', `Newest first; the page keeps the last ${MAX}.`), list);
  let lastId = null, ctl = null, paused = false, stopped = false, count = 0;

  async function connect() {
    ctl = new AbortController();
    const q = new URLSearchParams();
    if (category.value) q.set('category', category.value);
    if (type.value) q.set('type', type.value);
    if (lastId == null) { // start at the head: the tail shows what happens from now on
      const h = await api('/health');
      lastId = h.data ? h.data.position : 0;
    }
    const mine = ctl;
    try {
      await sse('/subscribe?' + q, {
        lastId, signal: ctl.signal,
        onOpen: () => { state.textContent = `live after position ${lastId}`; },
        onEvent: (m) => {
          if (m.event !== 'message') return;
          const e = JSON.parse(m.data);
          lastId = m.id != null ? Number(m.id) : e.position;
          list.prepend(eventCard(e));
          count++;
          while (list.childElementCount > MAX) list.lastElementChild.remove();
          state.textContent = `live: ${count} events received, last position ${lastId}`;
        },
      });
    } catch (e) {
      if (mine.signal.aborted) return;
      state.textContent = 'disconnected: ' + e.message;
    }
    // The stream ended by itself (a restart): reconnect from where it got, at most once a second.
    if (!mine.signal.aborted && !stopped && !paused) setTimeout(() => { if (!paused && !stopped && ctl === mine) connect(); }, 1000);
  }
  function stop() { if (ctl) ctl.abort(); }
  toggle.addEventListener('click', () => {
    paused = !paused;
    toggle.textContent = paused ? 'Resume' : 'Pause';
    if (paused) { stop(); state.textContent = `paused at position ${lastId}`; } else connect();
  });
  form.addEventListener('submit', (e) => {
    e.preventDefault();
    stop();
    list.replaceChildren();
    lastId = null;
    paused = false;
    toggle.textContent = 'Pause';
    connect();
  });
  connect();
  return () => { stopped = true; stop(); };
}
