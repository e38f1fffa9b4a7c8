// Renders /api/openapi.json with the vendored Swagger UI (kept out of the page for a strict CSP).
window.addEventListener("DOMContentLoaded", function () {
  window.SwaggerUIBundle({
    url: document.getElementById("api-docs").dataset.specUrl,
    dom_id: "#api-docs",
    deepLinking: true,
  });
});
