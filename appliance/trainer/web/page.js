// The trainer page's one write: approve or cancel a job through the admin API, with a token the
// person typed in. The token stays in this tab's sessionStorage and goes only to this server.
"use strict";

const KEY = "anomaly-trainer-admin-token";

function token() {
  return sessionStorage.getItem(KEY);
}

function say(text, bad) {
  const message = document.getElementById("message");
  message.textContent = text;
  message.className = bad ? "bad" : "";
}

function refresh() {
  const signedIn = Boolean(token());
  document.getElementById("signin").hidden = signedIn;
  document.getElementById("signed-in").hidden = !signedIn;
  for (const button of document.querySelectorAll("button.admin")) {
    button.disabled = !signedIn;
  }
}

async function act(button) {
  const job = button.dataset.job;
  const action = button.dataset.action;
  button.disabled = true;
  try {
    const answer = await fetch(`/api/v1/admin/jobs/${encodeURIComponent(job)}/${action}`, {
      method: "POST",
      headers: { Authorization: `Bearer ${token()}` },
    });
    const body = await answer.json().catch(() => ({}));
    if (answer.ok) {
      say(`job ${job}: ${body.status ? body.status.replace("_", " ") : action + "d"}`, false);
      window.setTimeout(() => window.location.reload(), 600);
      return;
    }
    if (answer.status === 401 || answer.status === 403) {
      sessionStorage.removeItem(KEY);
      refresh();
    }
    say(`job ${job}: ${body.error || answer.statusText}`, true);
  } catch (error) {
    say(`job ${job}: the trainer did not answer (${error})`, true);
  }
  button.disabled = !token();
}

document.addEventListener("DOMContentLoaded", () => {
  document.getElementById("signin").addEventListener("submit", (event) => {
    event.preventDefault();
    const field = document.getElementById("token");
    sessionStorage.setItem(KEY, field.value.trim());
    field.value = "";
    say("", false);
    refresh();
  });
  document.getElementById("signout").addEventListener("click", () => {
    sessionStorage.removeItem(KEY);
    refresh();
  });
  for (const button of document.querySelectorAll("button.admin")) {
    button.addEventListener("click", () => act(button));
  }
  document.body.classList.add("scripted");
  refresh();
});
