// The site's only script: copy-to-clipboard and the resend countdowns (one per method).
// Both are conveniences: every page works without them.
"use strict";

document.addEventListener("DOMContentLoaded", () => {
  // <button data-copy="ID" data-copy-status="ID">: copy the text of element ID, one line per <li>.
  for (const button of document.querySelectorAll("[data-copy]")) {
    button.addEventListener("click", async () => {
      const source = document.getElementById(button.dataset.copy);
      const items = source.querySelectorAll("li");
      const text = items.length ? [...items].map((li) => li.textContent.trim()).join("\n") : source.textContent.trim();
      const status = document.getElementById(button.dataset.copyStatus);
      try {
        await navigator.clipboard.writeText(text + "\n");
        status.textContent = "Copied.";
      } catch (error) {
        status.textContent = "Copying isn't allowed here: select the codes and copy them.";
      }
    });
  }

  // <button data-enable-at="EPOCH_MS" disabled>: enable it when the resend cooldown ends.
  for (const button of document.querySelectorAll("button[data-enable-at]")) {
    const wait = Number(button.dataset.enableAt) - Date.now();
    setTimeout(() => { button.disabled = false; }, Math.max(0, wait));
  }
  // <p data-until="EPOCH_MS" data-done="TEXT"> with a <span class="countdown">: count the seconds
  // down, then say TEXT. Each method's button has its own.
  for (const note of document.querySelectorAll("[data-until]")) {
    const until = Number(note.dataset.until);
    const tick = () => {
      const left = Math.ceil((until - Date.now()) / 1000);
      if (left <= 0) {
        note.textContent = note.dataset.done;
        return;
      }
      note.querySelector(".countdown").textContent = String(left);
      setTimeout(tick, 1000);
    };
    tick();
  }
});
