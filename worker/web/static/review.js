// The review page's keys (see review.html): f, a, u decide, s skips, ? shows the help. A decision is the form's own
// POST, so the server's redirect loads the next item at once; one key press sends one decision.
(() => {
  "use strict";
  const help = document.getElementById("review-help");
  let sent = false;
  document.addEventListener("keydown", (event) => {
    if (event.altKey || event.ctrlKey || event.metaKey || event.isComposing) return;
    const target = event.target;
    if (target && (target.isContentEditable || /^(INPUT|TEXTAREA|SELECT)$/.test(target.tagName))) return;
    if (event.key === "?" || (event.key === "Escape" && help && !help.hidden)) {
      help.hidden = event.key === "Escape" ? true : !help.hidden;
      event.preventDefault();
      return;
    }
    const key = event.key.length === 1 ? event.key.toLowerCase() : "";
    const button = key && document.querySelector(`button[data-key="${key}"]`);
    if (!button || sent) return;
    sent = true;
    event.preventDefault();
    button.form.requestSubmit(button);
  });
  const left = document.getElementById("lease-left");
  if (left) {
    const until = Date.now() + 1000 * Number(left.dataset.seconds);
    const tick = () => {
      const seconds = Math.max(0, Math.round((until - Date.now()) / 1000));
      left.textContent = `${Math.floor(seconds / 60)}:${String(seconds % 60).padStart(2, "0")}`;
      left.classList.toggle("error", seconds === 0);
    };
    setInterval(tick, 1000);
  }
})();
