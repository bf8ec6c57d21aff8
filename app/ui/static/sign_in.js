"use strict";
// Checks the key with one cheap call before keeping it for this tab.
document.getElementById("sign-in-form").addEventListener("submit", async (event) => {
  event.preventDefault();
  const key = document.getElementById("api-key").value.trim();
  const error = document.getElementById("sign-in-error");
  error.textContent = "";
  const response = await fetch(`/v1/${UI.kinds[0].collection}?page_size=1`, { headers: { Authorization: `Bearer ${key}` } });
  if (!response.ok) {
    error.textContent = response.status === 401 ? "This key is not valid." : `The service answered ${response.status}.`;
    return;
  }
  sessionStorage.setItem(KEY_NAME, key);
  location.assign("/ui/jobs");
});
